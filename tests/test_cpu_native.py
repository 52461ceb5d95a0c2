"""The native CPU decode kernels (kernels/cpu/gemv.c) against float64 matrix products."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verispec.kernels import cpu as native
from verispec.kernels.cpu.linear import skinny_linear

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def _errors(x, w, b):
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    ours = skinny_linear(x, w, b).double()
    torch_err = (torch.nn.functional.linear(x, w, b).double() - ref).abs().max().item()
    return (ours - ref).abs().max().item(), torch_err


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 40),
    K=st.integers(1, 300),
    N=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
)
def test_skinny_linear_matches_float64(M, K, N, dtype, bias):
    g = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    ours, theirs = _errors(x, w, b)
    # at most 2x torch's own error at this precision, plus one output ulp for bf16 rounding
    ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * (x.double().abs() @ w.double().abs().T).max().item()
    assert ours <= 2 * theirs + ulp + 1e-6


def test_rows_are_bitwise_independent_of_batch_rows():
    """A token's product is the same bits in a k-token verify pass as in a one-token step."""
    g = torch.Generator().manual_seed(0)
    # every row count a native call takes, and more (split into calls of 16), an odd weight row
    # count, and K with a tail past the vector width; bf16 rows whose M activations outgrow
    # 16 KB are cut into K-chunks (K=1000: from M=9 on; K=3000: from M=3 on, several chunks)
    for dtype, K in ((torch.float32, 1000), (torch.bfloat16, 1000), (torch.bfloat16, 3000)):
        w = torch.randn(301, K, generator=g).to(dtype)
        for M in range(1, 21):
            x = torch.randn(M, K, generator=g).to(dtype)
            together = skinny_linear(x, w)
            alone = torch.cat([skinny_linear(x[i : i + 1], w) for i in range(M)])
            assert torch.equal(together, alone), (dtype, K, M)
            if M in (1, 5, 16):  # and as accurate as torch's own product
                ours, theirs = _errors(x, w, None)
                ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * (x.double().abs() @ w.double().abs().T).max().item()
                assert ours <= 2 * theirs + ulp + 1e-6, (dtype, K, M)


@pytest.mark.parametrize("M,K,N", [(1, 64, 5003), (1, 896, 1100), (2, 96, 4099), (5, 1536, 700), (1, 20, 9)])
def test_products_do_not_depend_on_the_thread_count(M, K, N):
    """The bf16 products split their rows into blocks that threads take and steal (steal.h):
    every row is computed exactly once whatever the thread count (a skipped block would leave
    the output's uninitialised memory), and bitwise the same."""
    g = torch.Generator().manual_seed(M * 7 + K + N)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3, 7):
            torch.set_num_threads(nt)
            outs.append(skinny_linear(x, w, b))
    finally:
        torch.set_num_threads(before)
    ours, theirs = _errors(x, w, b)
    ulp = torch.finfo(torch.bfloat16).eps * (x.double().abs() @ w.double().abs().T + b.double().abs()).max().item()
    assert ours <= 2 * theirs + ulp + 1e-6
    for nt, out in zip((2, 3, 7), outs[1:]):
        assert torch.equal(out, outs[0]), nt
    many = torch.full(((1 << 16) + 4096 * 37 + 11,), 0.5)  # blocks of 4096 floats and a ragged tail
    for nt in (1, 2, 5):
        torch.set_num_threads(nt)
        try:
            assert native.stream_read(many) == many.numel() * 0.5
        finally:
            torch.set_num_threads(before)


def test_fp32_output_is_the_widened_bf16_product():
    """out_f32 (the decoder's logits): bitwise ``skinny_linear(...).float()`` for whole rows and
    K-chunked rows, with a bias, through infinities and NaN; fp32 and the torch fallback too."""
    g = torch.Generator().manual_seed(5)
    for M, K, N in ((1, 896, 300), (5, 3000, 70), (16, 64, 33), (3, 20, 9)):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        w = torch.randn(N, K, generator=g).to(torch.bfloat16)
        b = torch.randn(N, generator=g).to(torch.bfloat16)
        w[0, 0], w[1, 0], x[0, 1] = float("inf"), float("nan"), 1e38
        for bias in (None, b):
            got = skinny_linear(x, w, bias, out_f32=True)
            assert got.dtype == torch.float32
            assert torch.equal(got.view(torch.int32), skinny_linear(x, w, bias).float().view(torch.int32)), (M, K, N)
    xf, wf = torch.randn(2, 40, generator=g), torch.randn(7, 40, generator=g)
    assert torch.equal(skinny_linear(xf, wf, out_f32=True), skinny_linear(xf, wf))
    xd = torch.randn(2, 40, dtype=torch.float64, generator=g)  # not native: torch's product, widened
    assert skinny_linear(xd, wf.double(), out_f32=True).dtype == torch.float32


def test_falls_back_to_torch_where_it_does_not_apply():
    w = torch.randn(8, 16)
    x = torch.randn(3, 16, dtype=torch.float64)  # fp64: not a native dtype
    assert torch.equal(skinny_linear(x, w.double()), torch.nn.functional.linear(x, w.double()))
    xt = torch.randn(3, 16)
    wt = torch.randn(16, 8).T  # non-contiguous weight
    assert torch.allclose(skinny_linear(xt, wt), torch.nn.functional.linear(xt, wt))


def test_model_uses_native_linear_and_keeps_tied_weights(tiny_hf):
    from verispec.kernels.cpu import SkinnyLinear
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama", tie_word_embeddings=True)
    m = LlamaForSampling.from_pretrained(path, n_positions=32)
    linears = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(type(mod) is SkinnyLinear for mod in linears)
    assert m.decoder.lm_head.weight is m.decoder.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_qkv_and_gate_up_share_one_buffer_of_registered_views(tiny_hf, dtype):
    """The cpu backend lays q/k/v and gate/up out in one buffer each: the registered parameters
    are views of it (no second copy, the checkpoint's parameter count), back to back, and every
    output is bitwise the separate products'."""
    from verispec.model import LlamaForSampling

    path, hf = tiny_hf("qwen2")  # q/k/v biases
    m = LlamaForSampling.from_pretrained(path, n_positions=32, amp=dtype, kernel_backend="cpu")
    assert sum(p.numel() for p in m.decoder.parameters()) == sum(p.numel() for p in hf.parameters())
    x = torch.randn(1, 3, hf.config.hidden_size).to(m.decoder.lm_head.weight.dtype)
    for layer in m.decoder.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("weight", "bias"):
            q, k, v = (getattr(p, name) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
            assert v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()
        assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + mlp.gate_proj.weight.nbytes
        fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        assert torch.equal(native.skinny_linear(x, fused, bias), separate)


def test_stream_read_sums_the_buffer():
    for n in (4096 * 3, 4096 * 2 + 77, 5):
        buf = torch.arange(n, dtype=torch.float32) % 7
        assert native.stream_read(buf) == pytest.approx(buf.double().sum().item())
    with pytest.raises(ValueError):
        native.stream_read(torch.zeros(10, dtype=torch.float64))
