"""kv_gather (token trees): the torch reference against an element-by-element expectation, the
NKI kernel against the reference (overlapping sources and destinations, rows with nothing to
move, several rows, random cases), its counters, and the rules it must not break."""

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
from verispec.kernels.testing import GatherCase, check_backend, check_gather_case, default_gather_cases

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def expected(k, src, start, counts):
    """The contract spelled out one element at a time on a snapshot of the old cache."""
    old, out = k.clone(), k.clone()
    for b in range(k.shape[0]):
        for i in range(int(counts[b])):
            for h in range(k.shape[1]):
                for d in range(k.shape[3]):
                    out[b, h, int(start[b]) + i, d] = old[b, h, int(src[b, i]), d]
    return out


def inputs(B=3, H_kv=2, S_max=12, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H_kv, S_max, D, generator=g), torch.randn(B, H_kv, S_max, D, generator=g)


# ---- the reference ----------------------------------------------------------------------------


def test_reference_reads_every_source_before_writing():
    k, v = inputs()
    src = torch.tensor([[9, 8, 7, 6], [0, 1, -1, 99], [11, 3, 3, 0]])  # row 1: unused entries are never looked at
    start, counts = torch.tensor([6, 4, 0]), torch.tensor([4, 2, 3])
    want_k, want_v = expected(k, src, start, counts), expected(v, src, start, counts)
    reference.kv_gather(k, v, src, start, counts)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert not torch.equal(want_k[0, :, 6:10], inputs()[0][0, :, 6:10])  # the case moved something


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a[2].__setitem__((1, 0), 12), IndexError, r"row 1 entry 0 reads slot 12 but the cache holds 12 slots"),
    (lambda a: a[2].__setitem__((0, 1), -1), IndexError, r"row 0 entry 1 reads slot -1"),
    (lambda a: a[3].__setitem__(2, 10), IndexError, r"row 2 writes slots 10..12 but the cache holds 12 slots"),
    (lambda a: a[4].__setitem__(0, 5), ValueError, r"counts\[0\] = 5 must be in 0..4"),
    (lambda a: a.__setitem__(2, a[2].float()), TypeError, "src_slots must be an integer tensor"),
    (lambda a: a.__setitem__(3, a[3][:2]), ValueError, r"dst_start must have shape \[3\]"),
    (lambda a: a.__setitem__(1, a[1][:, :1]), ValueError, "k_cache/v_cache must both be"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "differs from v_cache dtype"),
])
def test_reference_errors_name_the_row_and_slot(change, error, match):
    k, v = inputs()
    args = [k, v, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]]), torch.tensor([0, 4, 8]),
            torch.tensor([2, 3, 3])]
    change(args)
    before = (args[0].clone(), args[1].clone())
    with pytest.raises(error, match=match):
        reference.kv_gather(*args)
    assert torch.equal(args[0], before[0]) and torch.equal(args[1], before[1])  # nothing written


# ---- the NKI kernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("case", default_gather_cases(), ids=lambda c: c.describe()[:40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_gather_matches_the_reference(lane, case, dtype):
    for r in check_gather_case("nki", case, dtype):
        assert r.ok, f"{r.kernel} {r.case} {r.dtype}: {r.note or r.max_err}"


@st.composite
def gather_cases(draw):
    B, H_kv, D, N = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([8, 64])), draw(st.integers(1, 9))
    S_max = draw(st.integers(N, 40))
    counts = tuple(draw(st.integers(0, N)) for _ in range(B))
    src = tuple(tuple(draw(st.integers(0, S_max - 1)) for _ in range(N)) for _ in range(B))  # repeats allowed
    start = tuple(draw(st.integers(0, S_max - c)) for c in counts)
    return GatherCase(H_kv, D, S_max, src, start, counts)


@pytest.mark.parametrize("lane", LANES)
@SETTINGS
@given(case=gather_cases(), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_kv_gather_matches_the_reference_on_random_cases(lane, case, bf16, seed):
    if not any(case.counts):
        case = GatherCase(case.H_kv, case.D, case.S_max, case.src_slots, (0,) + case.dst_start[1:], (1,) + case.counts[1:])
    for r in check_gather_case("nki", case, torch.bfloat16 if bf16 else torch.float32, seed=seed):
        assert r.ok, f"{r.kernel} {r.case} {r.dtype}: {r.note or r.max_err}"


def test_backend_nki_provides_kv_gather_and_torch_is_reported_skipped():
    assert get_backend("nki").get("kv_gather") is backend.kv_gather
    report = check_backend("torch", quick=True, dtypes=(torch.float32,))
    assert report.passed and report.skipped == ["kv_gather"]
    assert "kv_gather        skipped: not provided by backend 'torch'" in str(report)
    assert not any(r.kernel.startswith("kv_gather") for r in report.results)


def test_wrapper_falls_back_when_the_staged_rows_do_not_fit(caplog):
    backend._noticed.clear()
    k, v = inputs(B=1, H_kv=1, S_max=300, D=128)
    src = torch.arange(299, -1, -1).reshape(1, 300)  # 300 rows of K and V: 300 KiB of fp32 per partition
    want = expected(k, src, torch.tensor([0]), torch.tensor([300]))
    with caplog.at_level(logging.WARNING, logger="verispec.kernels.nki"):
        backend.kv_gather(k, v, src, torch.tensor([0]), torch.tensor([300]))
    assert torch.equal(k, want)
    assert "kv_gather falls back to the torch reference for 300 rows of head_dim 128" in caplog.text


@interp_only
def test_kv_gather_counters_are_exact():
    B, H_kv, S_max, D = 2, 3, 16, 8
    k, v = inputs(B, H_kv, S_max, D)
    counts = [3, 0]
    backend.kv_gather(k, v, torch.tensor([[5, 6, 7, 0], [1, 1, 1, 1]]), torch.tensor([6, 0]), torch.tensor(counts))
    s = backend.last_stats["kv_gather"].as_dict()
    c, row_bytes = sum(counts), H_kv * D * 4  # rows moved; one slot of every head, fp32
    # per batch row: dst_start; per moved row: its slot index, K and V gathered, then scattered
    assert s["instructions"]["dma"] == B + 3 * c + 2 * c
    assert s["instructions"]["vector"] == c  # dst_start + i
    assert s["ops"]["fori_loop"] == 2 * B and s["ops"]["register_store"] == c and s["ops"]["register_load"] == B
    assert s["hbm_read_bytes"] == 4 * B + 4 * c + 2 * c * row_bytes
    assert s["hbm_write_bytes"] == 2 * c * row_bytes
    assert s["dma_bytes"] == s["hbm_read_bytes"] + s["hbm_write_bytes"]
    assert s["sbuf_peak_partition_bytes"] == 2 * 4 * D * 4 + 3 * 4  # one row's staged K and V (N=4) + 3 index tiles


# ---- rules the kernel itself must keep (the wrapper checks before it runs) ---------------------


def _kernel_args(src, start, counts, S_max=10):
    k = np.arange(2 * 2 * S_max * 4, dtype=np.float32).reshape(2, 2, S_max, 4)
    return k, k.copy() + 1000, np.asarray(src, np.int32), np.asarray(start, np.int32), np.asarray(counts, np.int32)


@interp_only
@pytest.mark.parametrize("src,start,counts,side", [
    ([[1, 2], [3, 10]], [0, 0], [2, 2], "src"),  # row 1 reads slot 10 of a 10-slot cache
    ([[1, 2], [3, -1]], [0, 0], [2, 2], "src"),
    ([[1, 2], [3, 4]], [0, 9], [2, 2], "dst"),  # row 1 writes slots 9 and 10
])
def test_kernel_out_of_range_slot_is_a_dma_bounds_error(src, start, counts, side):
    from verispec.kernels.nki.interp import NKIRuleError, nki
    from verispec.kernels.nki.kv_gather import kv_gather_kernel

    with pytest.raises(NKIRuleError, match=rf"rule 12 \(DMA bounds\): dma_copy {side} arg[01]"):
        nki.simulate(kv_gather_kernel)(*_kernel_args(src, start, counts))


@interp_only
def test_kernel_never_reads_unused_entries_and_bounds_each_row():
    from verispec.kernels.nki.interp import nki
    from verispec.kernels.nki.kv_gather import kv_gather_kernel

    k, v, src, start, counts = _kernel_args([[9, -7], [99, 99]], [3, 5], [1, 0])  # garbage past each row's count
    want = expected(torch.tensor(k), torch.tensor(src), torch.tensor(start), torch.tensor(counts)).numpy()
    nki.simulate(kv_gather_kernel)(k, v, src, start, counts)
    np.testing.assert_array_equal(k, want)
    assert k[0, 0, 3, 0] == 9 * 4  # slot 3 of row 0 now holds slot 9's row

    # the slot bound is the row's own slot axis: slot 10 of row 0 is a flat index inside row 1
    from verispec.kernels.nki.interp import NKIRuleError

    with pytest.raises(NKIRuleError, match="rule 12"):
        nki.simulate(kv_gather_kernel)(*_kernel_args([[10, 0], [0, 0]], [0, 0], [1, 0]))
