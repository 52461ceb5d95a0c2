"""The ``cpu`` kernel backend (kernels/cpu/attention.c): conformance with the torch reference
through check_backend, bitwise independence of T, the fallbacks, and its errors (token-tree masks:
test_cpu_tree_attention.py)."""

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels import get_backend, reference
from verispec.kernels.cpu.attention import MAX_T, verify_attention
from verispec.kernels.testing import check_backend

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def test_cpu_backend_passes_the_conformance_check():
    report = check_backend("cpu")
    assert report.passed, str(report)
    assert any(r.kernel == "verify_attention" for r in report.results)


def _case(B, H, H_kv, T, D, S_max, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 48, 24])  # fast path (64, 128), 16-lane generic path, scalar path
@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: scores far apart, most exponentials underflow to 0
def test_close_to_float64_and_each_query_independent_of_T(dtype, D, spread):
    T = 7  # more queries than the fast path's p . V group (5): two groups
    q, k, v = _case(3, 6, 2, T, D, 70, dtype)
    q = (q.float() * spread).to(dtype)
    pos = torch.tensor([0, 17, 70 - T])  # row 2 ends at the last slot; rows 1-2 cross 32-slot blocks
    out = verify_attention(q, k, v, pos, D**-0.5)
    ref64 = reference.verify_attention(q.double(), k.double(), v.double(), pos, D**-0.5)
    ref = reference.verify_attention(q, k, v, pos, D**-0.5)
    # no further from float64 than the reference plus one output rounding
    ulp = torch.finfo(dtype).eps * ref64.abs().max().item()
    assert (out.double() - ref64).abs().max() <= (ref.double() - ref64).abs().max() + ulp + 1e-6
    for t in range(T):  # query t alone (T = 1, at its own position) is bitwise query t of the block
        alone = verify_attention(q[:, :, t : t + 1].contiguous(), k, v, pos + t, D**-0.5)
        assert torch.equal(alone[:, :, 0], out[:, :, t])


@pytest.mark.parametrize("D", [64, 128, 24])
def test_nan_in_the_cache_reaches_the_output_as_in_the_reference(D):
    q, k, v = _case(1, 2, 1, 2, D, 12, torch.bfloat16)
    k[0, 0, 3, 5] = float("nan")  # a NaN score for slot 3
    pos = torch.tensor([6])
    out, ref = verify_attention(q, k, v, pos, 0.2), reference.verify_attention(q, k, v, pos, 0.2)
    assert torch.isnan(ref).all() and torch.isnan(out).all()


def test_non_contiguous_queries_are_taken_as_given():
    q, k, v = _case(1, 4, 2, 3, 32, 16, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the decoder's strides
    assert not qt.is_contiguous()
    pos = torch.tensor([4])
    assert torch.equal(verify_attention(qt, k, v, pos, 0.2), verify_attention(q, k, v, pos, 0.2))


def test_what_the_native_kernel_does_not_take_goes_to_the_reference():
    q, k, v = _case(1, 2, 1, MAX_T + 1, 16, 64, torch.float32)  # a prefill-sized block
    pos = torch.tensor([3])
    assert torch.equal(verify_attention(q, k, v, pos, 0.3), reference.verify_attention(q, k, v, pos, 0.3))
    q, k, v = _case(1, 2, 1, MAX_T + 1, 16, 64, torch.float32)  # a token tree too long for the native kernel
    mask = torch.ones(1, MAX_T + 1, MAX_T + 1, dtype=torch.bool).tril()
    assert torch.equal(verify_attention(q, k, v, pos, 0.3, mask), reference.verify_attention(q, k, v, pos, 0.3, mask))
    q, k, v = _case(1, 2, 1, 2, 16, 64, torch.float64)  # fp64: not a native dtype
    assert torch.equal(verify_attention(q, k, v, pos, 0.3), reference.verify_attention(q, k, v, pos, 0.3))


def test_bad_input_is_rejected_as_by_the_reference():
    q, k, v = _case(1, 4, 2, 2, 16, 8, torch.float32)
    with pytest.raises(IndexError, match="cache holds 8"):
        verify_attention(q, k, v, torch.tensor([7]), 0.25)  # slots 7..8 of 8
    with pytest.raises(ValueError, match="multiple of KV heads"):
        verify_attention(torch.zeros(1, 3, 2, 16), k, v, torch.tensor([0]), 0.25)


def test_cpu_backend_resolves_with_both_kernels():
    ks = get_backend("cpu")
    assert ks.name == "cpu" and ks.fallbacks == () and ks.verify_attention is verify_attention
