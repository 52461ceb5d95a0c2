"""Int8 draft weights (kernels/cpu/quant.py and gemv.c's verispec_gemv_i8): the quantizer's
rounding bound, the product against float64, the torch fallback, model wiring and its errors,
and that an int8 draft leaves greedy speculative output identical to target-only decoding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant_helpers import random_linear

from verispec.kernels import cpu as native
from verispec.kernels.cpu.quant import Int8Linear, quantize_rows, quantize_weights


def _reference(x, lin):  # float64 product with the dequantized weight, the bias added
    w = lin.qweight.double() * lin.scale.double()[:, None]
    return x.double() @ w.T + (lin.bias.double() if lin.bias is not None else 0)


def test_quantize_rows_rounds_to_nearest_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    w[5] = 0.0  # an all-zero row
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.abs().max() <= 127
    err = (q.double() * scale.double()[:, None] - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-5)).all()
    assert (q[5] == 0).all() and scale[5] == 1.0
    assert (q.abs().amax(1)[torch.arange(37) != 5] == 127).all()  # each row's extreme maps to +-127


def test_quantize_rows_in_blocks_is_the_whole_at_once():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(37, 50, generator=g) * torch.logspace(-3, 2, 37)[:, None]).bfloat16()
    w[7] = 0.0
    whole_q, whole_s = quantize_rows(w, block_rows=37)
    for rows in (1, 5, 36):
        q, s = quantize_rows(w, block_rows=rows)
        assert torch.equal(q, whole_q) and torch.equal(s, whole_s)
    w32 = w.float()
    kept = w32.clone()
    assert torch.equal(quantize_rows(w32, block_rows=4)[0], whole_q) and torch.equal(w32, kept)  # w32 untouched
    w[30, 3] = float("inf")  # found in whichever block holds it
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_rows(w, block_rows=4)


def test_quantize_rows_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_rows(torch.zeros(3))
    for bad in ([1.0, float("nan")], [5.0, float("nan"), 1.0], [float("nan"), 5.0], [1.0, -float("inf")]):
        w = torch.zeros(3000, len(bad))
        w[1234] = torch.tensor(bad)  # not the largest value of its row, in a long weight
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_rows(w)


@pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")
@settings(max_examples=40, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), K=st.integers(1, 300), N=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans())
def test_int8_product_matches_float64(M, K, N, dtype, bias):
    g = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N)
    lin = Int8Linear.from_linear(random_linear(N, K, bias, g))
    x = torch.randn(M, K, generator=g).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = _reference(x, lin)
    mag = x.double().abs() @ (lin.qweight.double().abs() * lin.scale.double()[:, None]).T
    out_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    # fp32 accumulation (K terms) plus one rounding of the output to its dtype
    tol = (K * torch.finfo(torch.float32).eps + out_ulp) * (mag + (lin.bias.double().abs() if bias else 0)) + 1e-6
    assert ((y.double() - ref).abs() <= tol).all()



def test_torch_fallback_agrees_with_the_native_product(monkeypatch):
    g = torch.Generator().manual_seed(1)
    lin = Int8Linear.from_linear(random_linear(40, 64, True, g))
    x = torch.randn(3, 5, 64, generator=g)
    native_y = lin(x)
    monkeypatch.setattr("verispec.kernels.cpu.quant.get_lib", lambda: None)  # no compiler: torch's product
    fallback_y = lin(x)
    assert fallback_y.shape == native_y.shape == (3, 5, 40)
    ref = _reference(x.reshape(15, 64), lin).reshape(3, 5, 40)
    assert torch.allclose(fallback_y.double(), ref, atol=1e-4) and torch.allclose(native_y.double(), ref, atol=1e-4)
    big = torch.randn(100, 64, generator=g)  # more rows than a decode step: torch's product
    assert torch.allclose(lin(big).double(), _reference(big, lin), atol=1e-4)


@pytest.mark.parametrize("amp", ["f32", "bf16"])
def test_int8_model_is_close_to_the_original(tiny_hf, amp):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("qwen2", tie_word_embeddings=True)  # q/k/v biases, tied LM head
    full = LlamaForSampling.from_pretrained(path, n_positions=32, amp=amp)
    q8 = LlamaForSampling.from_pretrained(path, n_positions=32, amp=amp, quant="int8")
    layers = len(q8.decoder.model.layers)
    int8 = [m for m in q8.decoder.modules() if isinstance(m, Int8Linear)]
    assert isinstance(q8.decoder.lm_head, Int8Linear) and q8.quant == "int8"
    assert len(int8) == 1 + layers * 7  # every projection and the head, all registered modules
    assert q8.decoder.model.embed_tokens.weight.dtype == full.decoder.model.embed_tokens.weight.dtype
    ids = torch.randint(0, full.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([0])
    a = torch.log_softmax(full.forward(ids, pos), -1)
    b = torch.log_softmax(q8.forward(ids, pos), -1)
    assert a.shape == b.shape and not torch.equal(a, b)  # it did quantize
    assert (a.exp() - b.exp()).abs().sum(-1).max() < 0.1  # total variation of the next-token laws


def test_quant_errors_name_the_problem(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    with pytest.raises(ValueError, match="unknown quant='int4'"):
        LlamaForSampling.from_pretrained(path, n_positions=16, quant="int4")
    with pytest.raises(ValueError, match="tp_degree=1"):
        LlamaForSampling.from_pretrained(path, n_positions=16, quant="int8", tp_degree=2)
    with pytest.raises(ValueError, match="unknown weight quantization"):
        quantize_weights(torch.nn.Module(), "fp4")


def test_int8_draft_keeps_greedy_output_identical(tiny_hf):
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama", num_hidden_layers=2)
    target = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2)
    draft = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, quant="int8")  # same model, int8
    ids = torch.randint(0, target.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    alone = target.sample(ids, 40, temperature=0.0)
    gen = SpeculativeGenerator(draft, target, 4)
    spec = gen.sample(ids, 40, temperature=0.0)
    assert torch.equal(spec, alone)
    st_ = gen.last_stats
    assert st_.proposed_drafts > 0 and st_.accepted_drafts > 0
