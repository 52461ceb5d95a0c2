"""The ``cpu`` backend's layer glue (kernels/cpu/layer.c, fused.c): RMSNorm with the residual add,
RoPE with the cache append and SiLU(gate) * up, against the torch reference they replace; and a
model run through them against the same model on the reference backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verispec.kernels import cpu as native
from verispec.kernels import get_backend, reference
from verispec.kernels.cpu import layer

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")

DTYPES = [torch.float32, torch.bfloat16]


def _within_ulps(a: torch.Tensor, b: torch.Tensor, n: int) -> bool:
    """Every element of a within n units in the last place (of a's dtype) of b's."""
    a64, b64 = a.double(), b.double()
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a64.abs(), b64.abs())
    return bool(((a64 - b64).abs() <= n * ulp + torch.finfo(a.dtype).tiny).all())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(rows=st.integers(1, 6), E=st.integers(1, 200), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_add_rms_norm_matches_the_reference(rows, E, dtype, scale):
    g = torch.Generator().manual_seed(rows * 1000 + E)
    x = (scale * torch.randn(rows, E, generator=g)).to(dtype)
    d = (scale * torch.randn(rows, E, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(E, generator=g)).to(dtype)
    h, y = layer.add_rms_norm(x, d, w, 1e-6)
    h_ref, y_ref = reference.add_rms_norm(x, d, w, 1e-6)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == x.shape
    assert torch.equal(h, h_ref)  # the residual add: the same rounding, bit for bit
    # the norm: fp32 sum of squares in another order, so at most one ulp off before the rounding
    n = 1 if dtype == torch.bfloat16 else 4
    assert _within_ulps(y, y_ref, n)
    assert _within_ulps(layer.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), n)


def test_rms_norm_rows_are_independent_of_their_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 96, generator=g).bfloat16()
    w = torch.randn(96, generator=g).bfloat16()
    together = layer.rms_norm(x, w, 1e-5)
    assert torch.equal(together, torch.stack([layer.rms_norm(x[i], w, 1e-5) for i in range(3)]))
    assert torch.equal(together[:, 2], layer.rms_norm(x[:, 2:3], w, 1e-5)[:, 0])


def _rope_case(B, T, H, H_kv, D, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, generator=g).to(dtype)
    cos = torch.randn(B, 1, T, D, generator=g).to(dtype)
    sin = torch.randn(B, 1, T, D, generator=g).to(dtype)
    cache = [torch.randn(B, H_kv, S, D, generator=g).to(dtype) for _ in range(4)]  # ours k, v; reference k, v
    cache[2].copy_(cache[0])
    cache[3].copy_(cache[1])
    return qkv, cos, sin, cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,H_kv,D", [(1, 1, 4, 2, 8), (2, 3, 6, 2, 16), (3, 5, 2, 2, 6), (1, 1, 14, 2, 64),
                                           (2, 5, 3, 1, 32), (1, 2, 4, 2, 128)])
@pytest.mark.parametrize("special", [False, True])
def test_rope_append_is_bitwise_the_reference(dtype, B, T, H, H_kv, D, special):
    """Half widths of 16 and more take the 16-lane path; ``special`` puts NaN, infinities, values
    whose products are denormal or overflow, and round-to-even ties into the inputs."""
    S = 12
    qkv, cos, sin, (k1, v1, k2, v2) = _rope_case(B, T, H, H_kv, D, S, dtype)
    if special:
        g = torch.Generator().manual_seed(D)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-38, -3e-39, 1e38, 3e38, 1.00390625,
                             1.01171875, 0.0, -0.0, 2.0 ** -133]).to(dtype)
        for t in (qkv, cos, sin):
            flat = t.view(-1)
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 3),), generator=g)
            flat[idx] = vals[torch.randint(0, len(vals), (len(idx),), generator=g)]
    pos = torch.tensor([S - T - b for b in range(B)])  # rows at different slots, the last ones used
    q = layer.rope_append(*_split(qkv, H, H_kv, D), cos, sin, k1, v1, pos)  # views into one fused row
    q_ref = reference.rope_append(*[t.contiguous() for t in _split(qkv, H, H_kv, D)], cos, sin, k2, v2, pos)
    assert q.shape == (B, H, T, D)
    if not special:
        assert torch.equal(q, q_ref) and torch.equal(k1, k2) and torch.equal(v1, v2)
    else:  # NaN where the reference has NaN (its payload is torch's business), the same bits elsewhere
        for a, b in ((q, q_ref), (k1, k2), (v1, v2)):
            assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any() == b.isnan().any()
            bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
            assert torch.equal(a.view(bits)[~a.isnan()], b.view(bits)[~b.isnan()])


def _split(qkv, H, H_kv, D):
    return qkv.split([H * D, H_kv * D, H_kv * D], -1)


def test_rope_append_takes_strided_input_and_leaves_other_appends_to_their_backend():
    qkv, cos, sin, (k1, v1, k2, v2) = _rope_case(2, 2, 4, 2, 8, 6, torch.float32)
    pos = torch.tensor([0, 3])
    big = torch.zeros(*qkv.shape[:-1], 2 * qkv.shape[-1])
    big[..., ::2] = qkv
    wide = big[..., ::2]  # a non-contiguous view of the same values
    assert not wide.is_contiguous()
    q, k, v = _split(wide, 4, 2, 8)
    assert torch.equal(layer.rope_append(q, k.contiguous(), v, cos, sin, k1, v1, pos),  # k and v rows apart
                       reference.rope_append(*_split(qkv, 4, 2, 8), cos, sin, k2, v2, pos))
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    calls = []
    q = layer.rope_append(*_split(qkv, 4, 2, 8), cos, sin, k1, v1, pos, kv_append=lambda *a: calls.append(a))
    assert len(calls) == 1 and q.shape == (2, 4, 2, 8)  # another backend's append is called, not fused away


def test_rope_append_rejects_slots_past_the_cache():
    qkv, cos, sin, (k1, v1, _, _) = _rope_case(1, 3, 4, 2, 8, 6, torch.bfloat16)
    before = k1.clone()
    with pytest.raises(IndexError, match="cache holds 6"):
        layer.rope_append(*_split(qkv, 4, 2, 8), cos, sin, k1, v1, torch.tensor([4]))
    assert torch.equal(k1, before)  # nothing written


def _silu_ref_exact_exp(gate_up: torch.Tensor) -> torch.Tensor:
    """The fp32 formula gate / (1 + e^-gate) with e^-gate correctly rounded to fp32 (computed in
    float64; inf past fp32's range, as in fp32), then rounded to the dtype, times up, rounded."""
    gate, up = gate_up.float().chunk(2, -1)
    e = torch.exp(-gate.double()).float()
    s = (gate / (1 + e)).to(gate_up.dtype)
    return (s.float() * up).to(gate_up.dtype)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.integers(1, 6), F=st.integers(1, 300), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.1, 3.0, 40.0]))
def test_silu_mul_matches_the_reference(rows, F, dtype, scale):
    g = torch.Generator().manual_seed(rows * 1000 + F)
    gu = (scale * torch.randn(rows, 2 * F, generator=g)).to(dtype)
    out = layer.silu_mul(*gu.chunk(2, -1))  # views into one [gate | up] row
    assert out.shape == (rows, F) and out.dtype == dtype
    ref = reference.silu_mul(*gu.chunk(2, -1))
    assert torch.equal(layer.silu_mul(*[t.contiguous() for t in gu.chunk(2, -1)]), out)  # two separate tensors
    # e^x here is not torch's: the fp32 silu may be an ulp or two off, so after the rounding(s) to
    # the model dtype an element is either equal or one ulp of the dtype away
    n = 1 if dtype == torch.bfloat16 else 4
    assert _within_ulps(out, ref, n), (out - ref).abs().max()
    assert _within_ulps(out, _silu_ref_exact_exp(gu), n)
    if dtype == torch.bfloat16:  # and almost always equal
        assert (out == ref).float().mean() >= 0.99


def test_silu_mul_edge_values_and_row_independence():
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 89.0, -89.0, 100.0, -100.0, 120.0, -120.0,
                         float("inf"), float("-inf"), float("nan"), 3.0])
    for dtype in DTYPES:
        gu = torch.cat([vals, torch.full_like(vals, 2.0)]).to(dtype)[None]  # up = 2
        out, ref = layer.silu_mul(*gu.chunk(2, -1)), reference.silu_mul(*gu.chunk(2, -1))
        assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
        fin = ~ref.isnan()
        assert torch.equal(out[fin].isinf(), ref[fin].isinf()) and _within_ulps(out[fin & ~ref.isinf()], ref[fin & ~ref.isinf()], 4)
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(5, 2 * 4864, generator=g).bfloat16()  # parallel (many elements) and a 16-lane tail-free F
    together = layer.silu_mul(*gu.chunk(2, -1))
    assert torch.equal(together, torch.cat([layer.silu_mul(*gu[i : i + 1].chunk(2, -1)) for i in range(5)]))
    odd = torch.randn(3, 2 * 37, generator=g).bfloat16()  # F % 16 != 0: the tail lanes agree with full blocks
    wide = torch.cat([odd[:, :37], odd[:, :37], odd[:, :37], odd[:, 37:], odd[:, 37:], odd[:, 37:]], -1)
    assert torch.equal(layer.silu_mul(*wide.chunk(2, -1))[:, 37:74], layer.silu_mul(*odd.chunk(2, -1)))
    with pytest.MonkeyPatch.context() as mp:  # gate and up of different shapes: the reference decides
        mp.setattr(reference, "silu_mul", lambda g, u: "reference")
        assert layer.silu_mul(torch.zeros(2, 5), torch.zeros(2, 4)) == "reference"


def test_cpu_backend_carries_the_layer_glue():
    ks = get_backend("cpu")
    assert ks.get("rms_norm") is layer.rms_norm and ks.get("rope_append") is layer.rope_append
    assert ks.get("silu_mul") is layer.silu_mul
    assert get_backend("torch").get("rms_norm") is None  # the decoder then uses the reference


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_model_on_the_cpu_backend_matches_the_reference_backend(tiny_hf, dtype):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("qwen2", vocab_size=256)
    kw = dict(n_positions=48, batch_size=2, amp=dtype)
    ref = LlamaForSampling.from_pretrained(path, kernel_backend="torch", **kw)
    ours = LlamaForSampling.from_pretrained(path, kernel_backend="cpu", **kw)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    lr = ref.forward(ids, torch.tensor([0, 0]))
    lo = ours.forward(ids, torch.tensor([0, 0]))
    step = torch.tensor([[3], [7]])
    lr2, lo2 = ref.forward(step, torch.tensor([9, 9])), ours.forward(step, torch.tensor([9, 9]))
    tol = 1e-4 if dtype == "f32" else 0.1
    assert (lr - lo).abs().max() < tol and (lr2 - lo2).abs().max() < tol
    if dtype == "f32":  # greedy text is the same (bf16 logits may tie-break differently)
        assert torch.equal(ours.sample(ids, 16, temperature=0.0), ref.sample(ids, 16, temperature=0.0))
