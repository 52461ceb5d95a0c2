"""W8A8 drafts (kernels/cpu/w8a8.c and quant.py's W8A8Linear): the activation rounding bound,
the native product against its torch reference, the fallback, model wiring, and that a W8A8
draft leaves greedy speculative output identical to target-only decoding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant_helpers import random_linear

from verispec.kernels import cpu as native
from verispec.kernels.cpu.build import get_lib
from verispec.kernels.cpu.quant import QB, Int8Linear, W8A8Linear, quantize_activations, w8a8_reference



def _native_w8a8() -> bool:
    lib = get_lib()
    return lib is not None and bool(lib.verispec_w8a8_available())


def test_activations_round_to_nearest_within_half_a_step_per_block():
    g = torch.Generator().manual_seed(0)
    K = 3 * QB + 5  # a ragged last block
    x = torch.randn(4, K, generator=g) * torch.logspace(-3, 3, K)  # blocks of very different sizes
    x[2] = 0.0  # all-zero rows quantize to zeros with scale 0
    xq, xs = quantize_activations(x)
    assert xq.shape == (4, 4, QB) and xs.shape == (4, 4)
    assert xq.abs().max() <= 127 and torch.equal(xq, xq.round())
    back = (xq * xs[..., None]).reshape(4, -1)[:, :K]
    step = xs.repeat_interleave(QB, dim=1)[:, :K]
    assert ((back.double() - x.double()).abs() <= step.double() / 2 * (1 + 1e-5) + 1e-30).all()
    assert (xq[2] == 0).all() and (xs[2] == 0).all()
    assert (xq[:, 3, 5:] == 0).all()  # the padding past K


@settings(max_examples=40, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), K=st.integers(1, 300), N=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans())
def test_w8a8_product_is_the_reference_and_within_the_activation_rounding(M, K, N, dtype, bias):
    g = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N)
    lin = W8A8Linear.from_linear(random_linear(N, K, bias, g))
    x = torch.randn(M, K, generator=g).to(dtype)
    y = lin(x)  # native when AVX512-VNNI is there (M <= 64 rows), else the torch reference
    assert y.dtype == dtype and y.shape == (M, N)
    ref = w8a8_reference(x, lin.qweight, lin.scale, lin.bias).double()
    w = lin.qweight.double().abs() * lin.scale.double()[:, None]  # |dequantized weights|
    out_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    mag = x.double().abs() @ w.T + (lin.bias.double().abs() if bias else 0)
    # fp32 accumulation over the blocks plus one output rounding, against the reference
    assert ((y.double() - ref).abs() <= (K * torch.finfo(torch.float32).eps + 2 * out_ulp) * mag + 1e-6).all()
    # the reference against int8 weights with exact activations: half an activation step per value
    exact = x.double() @ (lin.qweight.double() * lin.scale.double()[:, None]).T + (lin.bias.double() if bias else 0)
    _, xs = quantize_activations(x)
    half_step = (xs.double().repeat_interleave(QB, dim=1)[:, :K] / 2)  # [M, K]
    bound = half_step @ w.T * (1 + 1e-6) + (out_ulp + 1e-6) * mag + 1e-6
    assert ((ref - exact).abs() <= bound).all()


@pytest.mark.skipif(not _native_w8a8(), reason="no AVX512-VNNI: W8A8Linear runs its torch reference")
def test_native_kernel_runs_and_falls_back_beyond_a_decode_step(monkeypatch):
    g = torch.Generator().manual_seed(1)
    lin = W8A8Linear.from_linear(random_linear(40, 200, True, g))
    x = torch.randn(3, 5, 200, generator=g)
    calls = []
    lib = get_lib()
    monkeypatch.setattr("verispec.kernels.cpu.quant.get_lib", lambda: calls.append(1) or lib)
    y = lin(x)
    assert calls and y.shape == (3, 5, 40)
    ref = w8a8_reference(x, lin.qweight, lin.scale, lin.bias)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4) and not torch.equal(y, Int8Linear.forward(lin, x))
    big = torch.randn(100, 200, generator=g)  # more rows than a decode step: the reference
    assert torch.equal(lin(big), w8a8_reference(big, lin.qweight, lin.scale, lin.bias))


def test_w8a8_model_is_close_to_the_original_and_keeps_greedy_output(tiny_hf):
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("qwen2", tie_word_embeddings=True, num_hidden_layers=2)
    full = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16", batch_size=2)
    q8 = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16", batch_size=2, quant="w8a8")
    assert q8.quant == "w8a8" and isinstance(q8.decoder.lm_head, W8A8Linear)
    assert all(type(m) is not Int8Linear for m in q8.decoder.modules())  # every quantized layer is W8A8
    ids = torch.randint(0, full.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([0, 0])
    a, b = torch.softmax(full.forward(ids, pos), -1), torch.softmax(q8.forward(ids, pos), -1)
    assert not torch.equal(a, b) and (a - b).abs().sum(-1).max() < 0.15  # total variation of next-token laws
    full.reset()
    alone = full.sample(ids, 40, temperature=0.0)
    gen = SpeculativeGenerator(q8, full, 4)
    assert torch.equal(gen.sample(ids, 40, temperature=0.0), alone)
    assert gen.last_stats.accepted_drafts > 0
