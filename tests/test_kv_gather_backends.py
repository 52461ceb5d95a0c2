"""kv_gather on the native backends against the torch reference: random cases (sources that
overlap destinations, rows with nothing to move, several rows, fp32 and bf16, int32 and int64
slots, strided caches) must give exactly the reference's caches, and bad arguments must raise
the reference's errors without writing.

The helpers here are also used by tests/triton_modes/interp_kernels.py for the triton backend,
which must run in a child process under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels import get_backend, reference
from verispec.kernels.registry import KernelSet
from verispec.kernels.testing import GatherCase, check_gather_case


def random_gather(gen: torch.Generator, B: int, H_kv: int, S_max: int, D: int, N: int, dtype, overlap: bool,
                  index_dtype=torch.int32, strided_v: bool = False):
    """Caches and arguments of one random kv_gather call. With ``overlap`` each row's sources lie
    in the slots its run is written to and just after (a tree's nodes past the committed prefix);
    row 1 (when B > 1) moves nothing."""
    k = torch.randn(B, H_kv, S_max, D, generator=gen).to(dtype)  # [B, H_kv, S_max, D]
    v = torch.randn(B, S_max, H_kv, D, generator=gen).to(dtype)  # [B, S_max, H_kv, D]
    v = v.transpose(1, 2) if strided_v else v.transpose(1, 2).contiguous()  # [B, H_kv, S_max, D]
    src = torch.empty(B, N, dtype=index_dtype)  # [B, N]
    start = torch.empty(B, dtype=index_dtype)
    counts = torch.randint(1, N + 1, (B,), generator=gen).to(index_dtype)
    if B > 1:
        counts[1] = 0
    for b in range(B):
        if overlap:
            lo = int(torch.randint(0, S_max - 2 * N + 1, (1,), generator=gen))
            src[b] = lo + torch.randperm(2 * N, generator=gen)[:N]  # slots lo .. lo + 2N - 1
            start[b] = lo
        else:
            src[b] = torch.randint(0, S_max, (N,), generator=gen)  # repeats allowed
            start[b] = int(torch.randint(0, S_max - N + 1, (1,), generator=gen))
    return k, v, src, start, counts


def assert_matches_reference(kv_gather, k, v, src, start, counts) -> None:
    """``kv_gather`` on copies of (k, v) leaves exactly the reference's caches."""
    ek, ev = k.clone(), v.clone()
    reference.kv_gather(ek, ev, src, start, counts)
    assert not (torch.equal(ek, k) and torch.equal(ev, v)) or not any(counts.tolist()), "a case that moves nothing"
    gk, gv = k.clone(), v.clone()
    kv_gather(gk, gv, src, start, counts)
    assert torch.equal(gk, ek) and torch.equal(gv, ev), f"src={src.tolist()} start={start.tolist()} counts={counts.tolist()}"


def assert_same_errors(kv_gather) -> None:
    """Bad arguments raise the reference's exception type and message, and write nothing."""
    gen = torch.Generator().manual_seed(7)
    k, v, src, start, counts = random_gather(gen, 3, 2, 20, 16, 4, torch.float32, overlap=False)
    counts = torch.tensor([2, 4, 3], dtype=torch.int32)
    start = torch.tensor([0, 16, 5], dtype=torch.int32)
    out_of_range = src.clone()
    out_of_range[1, 2] = 20  # row 1 entry 2 reads slot 20 of 20
    negative = src.clone()
    negative[2, 0] = -1
    unused = src.clone()
    unused[0, 3] = 99  # beyond counts[0]: never read, so no error
    cases = {
        "oob source": (k, v, out_of_range, start, counts),
        "negative source": (k, v, negative, start, counts),
        "run past the end": (k, v, src, torch.tensor([0, 17, 5], dtype=torch.int32), counts),
        "count above N": (k, v, src, start, torch.tensor([2, 5, 0], dtype=torch.int32)),
        "float slots": (k, v, src.float(), start, counts),
        "counts shape": (k, v, src, start, counts[:2]),
        "src_slots shape": (k, v, src[:2], start, counts),
        "cache dtypes": (k, v.bfloat16(), src, start, counts),
    }
    for what, (kc, vc, *args) in cases.items():
        with pytest.raises(Exception) as expected:
            reference.kv_gather(kc.clone(), vc.clone(), *args)
        gk, gv = kc.clone(), vc.clone()
        with pytest.raises(type(expected.value)) as got:
            kv_gather(gk, gv, *args)
        assert str(got.value) == str(expected.value), what
        assert torch.equal(gk, kc) and torch.equal(gv, vc), f"{what}: raised after writing"
    with pytest.raises(IndexError, match="row 1 entry 2 reads slot 20"):
        kv_gather(k, v, out_of_range, start, counts)
    assert_matches_reference(kv_gather, k, v, unused, start, counts)


def run_random_cases(kv_gather, dtypes=(torch.float32, torch.bfloat16), seeds=range(4)) -> int:
    """Random cases of every kind for ``kv_gather``; returns how many ran."""
    n = 0
    for dtype in dtypes:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            for B, H_kv, S_max, D, N in ((1, 2, 12, 16, 4), (3, 3, 40, 64, 16), (2, 1, 33, 24, 7)):
                for overlap in (True, False):
                    index_dtype = torch.int64 if seed % 2 else torch.int32
                    case = random_gather(gen, B, H_kv, S_max, D, N, dtype, overlap, index_dtype, strided_v=seed == 3)
                    assert_matches_reference(kv_gather, *case)
                    n += 1
    return n


# ---- the cpu backend ---------------------------------------------------------------------------

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


@pytest.fixture
def cpu_gather():
    fn = get_backend("cpu").get("kv_gather")
    assert fn is not None, "the cpu backend provides no kv_gather"
    return fn


@needs_native
def test_cpu_random_cases_match_the_reference(cpu_gather):
    assert run_random_cases(cpu_gather) == 48


@needs_native
def test_cpu_nothing_to_move_and_the_last_slot(cpu_gather):
    gen = torch.Generator().manual_seed(1)
    k, v, src, start, _ = random_gather(gen, 2, 2, 10, 8, 3, torch.bfloat16, overlap=False)
    gk, gv = k.clone(), v.clone()
    cpu_gather(gk, gv, src, torch.tensor([99, -5]), torch.tensor([0, 0]))  # no run: its start is never used
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert_matches_reference(cpu_gather, k, v, torch.tensor([[9, 0, 9], [1, 2, 3]]), torch.tensor([7, 0]),
                             torch.tensor([3, 1]))


@needs_native
def test_cpu_errors_are_the_references(cpu_gather):
    assert_same_errors(cpu_gather)


@needs_native
def test_cpu_conformance_report_includes_kv_gather():
    from verispec.kernels.testing import check_backend

    report = check_backend("cpu", attention_cases=[], append_cases=[])
    assert report.passed, str(report)
    assert "kv_gather" not in report.skipped
    assert sum(r.kernel.startswith("kv_gather") for r in report.results) >= 20


def _in_place_without_staging(k, v, src_slots, dst_start, counts):
    """A wrong kv_gather: moves row by row, so a source already overwritten is read after its write."""
    src, start, cnt = reference.check_kv_gather_args(k, v, src_slots, dst_start, counts)
    for b in range(len(cnt)):
        for i in range(cnt[b]):
            for cache in (k, v):
                cache[b, :, start[b] + i] = cache[b, :, src[b][i]]


def test_the_checks_catch_a_gather_that_is_not_overlap_safe():
    with pytest.raises(AssertionError):
        run_random_cases(_in_place_without_staging, dtypes=(torch.float32,), seeds=range(1))
    wrong = KernelSet("wrong", reference.verify_attention, reference.kv_append,
                      extras={"kv_gather": _in_place_without_staging})
    results = check_gather_case(wrong, GatherCase(2, 64, 12, ((9, 8, 7, 6),), (6,), (4,)))
    assert results[0].kernel == "kv_gather" and not results[0].ok
