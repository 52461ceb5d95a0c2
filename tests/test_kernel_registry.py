"""The backend registry (chosen once, fallbacks logged, user backends) and the conformance
helper's power: it must fail kernels that are wrong in the ways real kernels go wrong."""

from __future__ import annotations

import logging

import pytest
import torch

import verispec.kernels as K
from verispec.kernels import reference
from verispec.kernels.testing import AttnCase, check_backend


@pytest.fixture
def scratch_backend():
    names = []

    def register(name, **kernels):
        names.append(name)
        K.register_backend(name, **kernels)

    yield register
    for n in names:
        K.registry._backends.pop(n, None)


def test_builtin_backends_are_listed_and_nki_loads_lazily():
    names = K.available_backends()
    assert {"torch", "nki"} <= set(names)
    ks = K.get_backend("nki")
    assert ks.name == "nki" and ks.fallbacks == ()
    assert ks.verify_attention is not reference.verify_attention


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(KeyError, match="unknown kernel backend 'nope'; available: .*torch"):
        K.get_backend("nope")


def test_partial_backend_falls_back_with_one_logged_notice(scratch_backend, caplog):
    calls = []

    def my_attention(*args):
        calls.append(1)
        return reference.verify_attention(*args)

    scratch_backend("only_attention", verify_attention=my_attention)
    with caplog.at_level(logging.WARNING, logger="verispec.kernels"):
        ks = K.get_backend("only_attention")
        K.get_backend("only_attention")
    assert ks.fallbacks == ("kv_append",) and ks.kv_append is reference.kv_append
    assert caplog.text.count("has no kv_append; using the torch reference") == 1
    q = torch.randn(1, 2, 1, 8)
    cache = torch.randn(1, 2, 4, 8)
    ks.verify_attention(q, cache, cache, torch.tensor([2]), 0.5, None)
    assert calls == [1]


def test_use_backend_switches_module_level_dispatch(scratch_backend):
    seen = []
    scratch_backend("spy", kv_append=lambda *a: seen.append("append") or reference.kv_append(*a),
                    verify_attention=lambda *a: seen.append("attend") or reference.verify_attention(*a))
    k = torch.zeros(1, 1, 4, 2)
    with K.use_backend("spy") as ks:
        assert ks.name == "spy"
        K.kv_append(k, k.clone(), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([1]))
        K.verify_attention(torch.ones(1, 1, 1, 2), k, k, torch.tensor([1]), 1.0)
    K.verify_attention(torch.ones(1, 1, 1, 2), k, k, torch.tensor([1]), 1.0)  # back to torch
    assert seen == ["append", "attend"]


def test_env_var_chooses_the_default_backend(monkeypatch):
    monkeypatch.setenv("VERISPEC_KERNELS", "nki")
    assert K.default_backend_name() == "nki"
    assert K.get_backend().name == "nki"
    monkeypatch.delenv("VERISPEC_KERNELS")
    from verispec.kernels import cpu as native

    assert K.default_backend_name("cpu") == ("cpu" if native.available() else "torch")  # a CPU model
    assert K.default_backend_name() == "torch"  # the module-level kernels


def test_register_backend_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        K.register_backend("")
    with pytest.raises(TypeError, match="not callable"):
        K.register_backend("broken", verify_attention=42)


# ---- power of check_backend -----------------------------------------------------------------


def _sees_stale_slots(q, k_cache, v_cache, positions, scale, active_mask=None):
    """Wrong on purpose: ignores positions and attends to the whole cache."""
    B, H, T, D = q.shape
    G = H // k_cache.shape[1]
    k = k_cache.repeat_interleave(G, dim=1).float()
    v = v_cache.repeat_interleave(G, dim=1).float()
    p = torch.softmax(q.float() @ k.transpose(-1, -2) * scale, dim=-1)
    return (p @ v).to(q.dtype)


def _bf16_softmax(q, k_cache, v_cache, positions, scale, active_mask=None):
    """Wrong on purpose: softmax in bf16 rather than fp32."""
    return reference.verify_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), positions, scale,
                                      active_mask).to(q.dtype) if q.dtype == torch.float32 else reference.verify_attention(
        q, k_cache, v_cache, positions, scale, active_mask)


def _silent_append(k_cache, v_cache, k_new, v_new, positions):
    """Wrong on purpose: clips out-of-range writes instead of raising."""
    T, S = k_new.shape[2], k_cache.shape[2]
    for b, p in enumerate(positions.tolist()):
        n = max(0, min(T, S - p))
        k_cache[b, :, p:p + n] = k_new[b, :, :n]
        v_cache[b, :, p:p + n] = v_new[b, :, :n]


@pytest.mark.parametrize("kernels,kernel_name", [
    (dict(verify_attention=_sees_stale_slots), "verify_attention"),
    (dict(verify_attention=_bf16_softmax), "verify_attention"),
    (dict(kv_append=_silent_append), "kv_append(oob)"),
])
def test_check_backend_fails_wrong_kernels(scratch_backend, kernels, kernel_name):
    scratch_backend("wrong", **kernels)
    report = check_backend("wrong", quick=True, dtypes=(torch.float32,))
    assert not report.passed
    assert {r.kernel for r in report.failures} == {kernel_name}
    assert "FAIL" in str(report)


def test_check_backend_passes_the_reference_and_covers_the_awkward_shapes():
    report = check_backend("torch")
    assert report.passed, str(report)
    cases = [r.case for r in report.results if r.kernel == "verify_attention"]
    assert {f"T={t} " in " ".join(cases) for t in range(1, 17)} == {True}
    for needle in ("(g1)", "(g2)", "(g7)", "D=64", "D=128", "tree", "T=37", "T=130"):
        assert any(needle in c for c in cases), needle
    assert {r.dtype for r in report.results} == {"float32", "bfloat16"}


def test_check_backend_reports_crashes_readably(scratch_backend):
    def crashes(*a):
        raise RuntimeError("kernel exploded")

    scratch_backend("crashy", verify_attention=crashes)
    report = check_backend("crashy", quick=True, dtypes=(torch.float32,),
                           attention_cases=[AttnCase(1, 2, 1, 2, 64, (3,), 8)], append_cases=[])
    assert not report.passed and "RuntimeError: kernel exploded" in str(report)
