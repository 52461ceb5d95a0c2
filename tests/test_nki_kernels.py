"""The NKI kernels against the torch reference: conformance, random legal shapes (hypothesis),
the wrapper's fallbacks, and the counters the interpreter reports.

Each kernel test runs in one lane: through verispec's interpreter here, or through AWS's
``nki.simulate`` on a machine where the real ``nki`` package imports (the kernel files bind to
whichever ``verispec.kernels.nki._nki`` found).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nki_lanes import LANES, interp_only

from verispec.kernels import get_backend, reference
from verispec.kernels.nki import backend
from verispec.kernels.testing import AppendCase, AttnCase, check_append_case, check_attention_case, check_backend

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("lane", LANES)
def test_check_backend_nki_passes(lane):
    report = check_backend("nki")
    assert report.passed, str(report)
    assert len(report.results) == 2 * (len(report.results) // 2) > 40


@st.composite
def attention_cases(draw):
    B, H_kv, T = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 16))
    G, D = draw(st.sampled_from([1, 2, 3, 7])), draw(st.sampled_from([16, 64, 128]))
    # the longest row's prior length, chosen around the 128/512-slot tile edges; the others shorter
    longest = draw(st.sampled_from([0, 1, 5, 127, 128, 129, 300, 511, 512, 513, 777, 1024, 1100]))
    positions = [draw(st.integers(0, longest)) for _ in range(B - 1)]
    positions.insert(draw(st.integers(0, B - 1)), longest)
    S_max = longest + T + draw(st.integers(0, 40))
    return AttnCase(B, G * H_kv, H_kv, T, D, tuple(positions), S_max, tree=draw(st.booleans()))


@pytest.mark.parametrize("lane", LANES)
@SETTINGS
@given(case=attention_cases(), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_verify_attention_matches_reference_on_random_shapes(lane, case, bf16, seed):
    r = check_attention_case("nki", case, torch.bfloat16 if bf16 else torch.float32, seed=seed)
    assert r.ok, f"{r.case} {r.dtype}: err {r.max_err:.3g} > tol {r.tol:.3g} {r.note}"


@st.composite
def append_cases(draw):
    B, H_kv, T, D = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.sampled_from([8, 64]))
    S_max = draw(st.integers(T, 300))
    return AppendCase(B, H_kv, T, D, tuple(draw(st.integers(0, S_max - T)) for _ in range(B)), S_max)


@pytest.mark.parametrize("lane", LANES)
@SETTINGS
@given(case=append_cases(), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_kv_append_matches_reference_on_random_shapes(lane, case, bf16, seed):
    for r in check_append_case("nki", case, torch.bfloat16 if bf16 else torch.float32, seed=seed):
        assert r.ok, f"{r.kernel} {r.case} {r.dtype}: {r.note or r.max_err}"


@interp_only
def test_kv_append_kernel_itself_rejects_out_of_range_positions():
    from verispec.kernels.nki.interp import NKIRuleError, nki
    from verispec.kernels.nki.kv_append import kv_append_kernel

    k = np.zeros((2, 2, 10, 4), np.float32)
    new = np.ones((2, 2, 3, 4), np.float32)
    with pytest.raises(NKIRuleError, match="rule 12"):  # row 1 would write slots 8, 9, 10
        nki.simulate(kv_append_kernel)(k, k.copy(), new, new, np.array([0, 8], np.int32))


@interp_only
def test_verify_attention_counters_are_exact():
    """One (b, g) of 2 heads x 4 queries over 600 prior slots: every byte the kernel moves."""
    B, H, H_kv, T, D, P = 1, 2, 1, 4, 64, 600
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, H_kv, P + T + 5, D, generator=g), torch.randn(B, H_kv, P + T + 5, D, generator=g)
    backend.verify_attention(q, k, v, torch.tensor([P]), D**-0.5)
    s = backend.last_stats["verify_attention"].as_dict()
    f = 4  # bytes per float32
    rows = H * T
    reads = {"positions": 4 + rows * 4, "q": H * T * D * f, "active K+V": 2 * T * D * f, "mask": H * T * T * f,
             "prior K+V": 2 * P * D * f}
    assert s["hbm_read_bytes"] == sum(reads.values())
    assert s["hbm_write_bytes"] == H * T * D * f
    # tensor engine: per block one QK^T matmul, then per 128 slots one P^T transpose + one PV matmul
    active, tile0, tile1 = 1 + 1 * 2, 1 + 4 * 2, 1 + 1 * 2  # T=4 slots; 600 prior = 512 + 88
    assert s["instructions"]["tensor"] == active + tile0 + tile1
    assert s["instructions"]["gpsimd"] == 2  # one iota per prior tile, for its mask
    assert s["psum_peak_banks"] <= 8 and s["sbuf_peak_partition_bytes"] < 192 * 1024


@interp_only
@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_verify_attention_largest_tiles_fit_on_chip(target):
    """128 query rows, head_dim 128, full 512-slot tiles: inside every on-chip budget."""
    from verispec.kernels.nki.interp import set_defaults

    old = set_defaults(target=target)
    try:
        r = check_attention_case("nki", AttnCase(1, 8, 1, 16, 128, (1100,), 1200))
    finally:
        set_defaults(**old.__dict__)
    assert r.ok, r
    assert backend.last_stats["verify_attention"].target == target


def test_fallbacks_are_logged_and_still_correct(caplog):
    backend._noticed.clear()
    ks = get_backend("nki")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(1, 1, 9, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 9, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([4])
    with caplog.at_level(logging.WARNING, logger="verispec.kernels.nki"):
        out = ks.verify_attention(q, k, v, pos, 0.3)
    torch.testing.assert_close(out, reference.verify_attention(q, k, v, pos, 0.3))
    assert "verify_attention falls back to the torch reference for dtype torch.float64" in caplog.text

    T = 130  # a token tree wider than one partition block
    q = torch.randn(1, 2, T, 8, generator=g)
    k, v = torch.randn(1, 1, T, 8, generator=g), torch.randn(1, 1, T, 8, generator=g)
    tree = torch.tril(torch.rand(1, T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="verispec.kernels.nki"):
        out = ks.verify_attention(q, k, v, torch.tensor([0]), 0.3, tree)
    torch.testing.assert_close(out, reference.verify_attention(q, k, v, torch.tensor([0]), 0.3, tree))
    assert "a token tree of 130 > 128 queries" in caplog.text


def test_out_of_range_append_raises_before_writing():
    ks = get_backend("nki")
    k = torch.zeros(1, 1, 6, 4)
    with pytest.raises(IndexError, match="out of range"):
        ks.kv_append(k, k.clone(), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), torch.tensor([4]))
    assert k.abs().sum() == 0
