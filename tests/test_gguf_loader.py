"""GGUF loading: verispec logits from a GGUF written like llama.cpp's converter equal HF's."""

import numpy as np
import pytest
import torch
from tiny_gguf import byte_level_vocab, llama_cpp_permute, llama_cpp_rope_freqs, write_tiny_gguf

from verispec.model import ConfigError, GGUFSource, LlamaForSampling
from verispec.model.gguf_source import llama3_rope_factors, permute_rope_rows, unpermute_rope_rows

TOL = 1e-4

CASES = {
    # name: (arch, hf overrides, gguf dtype)
    "llama-untied-f32": ("llama", dict(vocab_size=300), np.float32),
    "llama-tied-f32": ("llama", dict(vocab_size=300, tie_word_embeddings=True), np.float32),
    "llama-bias-gqa1-f32": ("llama", dict(vocab_size=300, attention_bias=True, num_key_value_heads=1), np.float32),
    "llama-tied-f16": ("llama", dict(vocab_size=300, tie_word_embeddings=True), np.float16),
    "qwen2-bias-untied-f32": ("qwen2", dict(vocab_size=300), np.float32),
    "qwen2-bias-tied-f16": ("qwen2", dict(vocab_size=300, tie_word_embeddings=True), np.float16),
}


def _randomize_biases(hf):
    """Non-zero q/k/v biases (so a wrong bias permutation shows). HF Llama's attention_bias also
    gives o_proj a bias, which the decoder does not model: keep that one zero."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.zero_() if "o_proj" in name else p.normal_(0, 0.5)


def _f16_reference(hf):
    """The HF model with its matrices rounded through fp16, as the F16 GGUF stores them."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_logits_match_hf(case, tiny_hf, tmp_path):
    arch, over, dtype = CASES[case]
    _, hf = tiny_hf(arch, **over)
    _randomize_biases(hf)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, arch, dtype=dtype, with_vocab_size=(case != "llama-tied-f32"))
    if dtype == np.float16:
        hf = _f16_reference(hf)
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2)
    assert m.config.model_type == arch
    assert m.config.tie_word_embeddings == over.get("tie_word_embeddings", False)
    assert m.config.attention_bias == (arch == "qwen2" or over.get("attention_bias", False))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits  # [2, 20, V]
    out = m.forward(ids[:, :12], torch.tensor([0, 0]))
    assert (out - ref[:, :12]).abs().max() < TOL
    out = m.forward(ids[:, 12:20], torch.tensor([12, 12]))  # verify block at an offset
    assert (out - ref[:, 12:20]).abs().max() < TOL


def test_gguf_config_from_metadata(tiny_hf, tmp_path):
    _, hf = tiny_hf("llama", vocab_size=300, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=50000.0)
    src = GGUFSource(write_tiny_gguf(tmp_path / "m.gguf", hf, "llama", with_vocab_size=False))
    c = src.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (300, 64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 50000.0  # f32 metadata read back as written
    assert c.tie_word_embeddings and "lm_head.weight" not in src.names()
    assert c.bos_token_id == 1 and c.eos_token_id == (2,)
    assert src.shape("model.layers.0.self_attn.k_proj.weight") == (32, 64)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6 * 8, 5)
    for n_head in (1, 2, 6):
        stored = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head, None))
        assert not torch.equal(stored, w)
        assert torch.equal(unpermute_rope_rows(stored, n_head), w)
        assert torch.equal(permute_rope_rows(w, n_head), stored)
    b = torch.arange(16, dtype=torch.float32)  # biases are permuted the same way
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(b.numpy(), 2, None)), 2), b)


def test_quantized_tensor_dequantizes_within_its_step(tiny_hf, tmp_path):
    """A Q8_0 tensor comes back within half a quantization step of the original values."""
    _, hf = tiny_hf("llama", vocab_size=300)
    path = write_tiny_gguf(tmp_path / "q.gguf", hf, "llama", q8_0=("blk.0.ffn_up.weight", "blk.1.attn_q.weight"))
    src = GGUFSource(path)
    assert src.gguf_type("model.layers.0.mlp.up_proj.weight") == "Q8_0"
    x = hf.model.layers[0].mlp.up_proj.weight.detach().numpy()  # [96, 64]
    y = src.load("model.layers.0.mlp.up_proj.weight").numpy()
    step = np.abs(x).reshape(96, 2, 32).max(-1, keepdims=True) / 127  # Q8_0: one scale per 32 values
    # half a step of rounding, plus the scale's own fp16 rounding (relative 2**-11) times |q| <= 127
    bound = step * (0.5 + 127 * 2.0**-11) + 1e-7
    assert y.shape == x.shape
    assert np.all(np.abs(y - x).reshape(96, 2, 32) <= bound)
    assert not np.array_equal(y, x)  # it really went through quantization
    part = src.load("model.layers.0.mlp.up_proj.weight", shard=(0, 2, 5))
    assert torch.equal(part, torch.from_numpy(y[2:5]))
    # a quantized, permuted Q projection is un-permuted after dequantization
    q = src.load("model.layers.1.self_attn.q_proj.weight")
    assert (q - hf.model.layers[1].self_attn.q_proj.weight).abs().max() < 0.01


def test_byte_level_vocab_helper_is_consistent():
    tokens, merges, types = byte_level_vocab(300)
    assert len(tokens) == len(types) == 300 and len(set(tokens)) == 300
    assert all(a + b in tokens for a, b in (m.split(" ") for m in merges))


def test_llama3_rope_freqs_tensor_matches_hf_rope_scaling(tiny_hf, tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency factors; far-out positions show it."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    _, hf = tiny_hf("llama", vocab_size=300, head_dim=32, rope_theta=10000.0, rope_scaling=scaling,
                    max_position_embeddings=1024)
    freqs = llama_cpp_rope_freqs(32, 10000.0, 8.0, 1.0, 4.0, 256)
    assert 2 <= ((freqs > 1) & (freqs < 8)).sum()  # the smooth band is populated
    path = write_tiny_gguf(tmp_path / "l3.gguf", hf, "llama", extra_tensors={"rope_freqs.weight": freqs})
    src = GGUFSource(path)
    rs = src.config.rope_scaling
    assert rs.rope_type == "llama3" and rs.factor == 8.0
    # only (high - low) and low / original_ctx are identifiable; with the default 8192 context the
    # recovered factors must still give HF's frequencies
    assert "rope_freqs.weight" not in src.names()
    base = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    recovered = base / torch.from_numpy(llama3_rope_factors(32, 10000.0, rs))
    assert torch.allclose(recovered.float(), hf.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)
    m = LlamaForSampling.from_pretrained(path, n_positions=700)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(600, 612)[None]  # [1, 12] rotary positions far past the original context
    with torch.no_grad():
        ref = hf(ids, position_ids=pos).logits
    out = m.forward(ids, torch.tensor([0]), position_ids=pos)
    assert (out - ref).abs().max() < TOL


def test_rope_freqs_that_are_not_llama3_are_refused(tiny_hf, tmp_path):
    _, hf = tiny_hf("llama", vocab_size=300)
    odd = np.array([1, 3, 1, 5, 2, 8, 1, 1], dtype=np.float32)  # head_dim 16: 8 factors, no llama3 shape
    path = write_tiny_gguf(tmp_path / "odd.gguf", hf, "llama", extra_tensors={"rope_freqs.weight": odd})
    with pytest.raises(ConfigError, match=r"odd\.gguf: rope_freqs does not follow llama3 rope scaling"):
        GGUFSource(path)
