"""Decoder logits equal Hugging Face transformers' on tiny random checkpoints (fp32, < 1e-4)."""

import pytest
import torch

from verispec.model import LlamaForSampling

TOL = 1e-4

CONFIGS = {
    "llama-gqa": ("llama", dict()),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
        ),
    ),
    "llama-linear-rope-headdim": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=32)),
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2-bias": ("qwen2", dict()),
}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor(ids)[None]).logits[0]


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, tiny_hf):
    arch, over = CONFIGS[request.param]
    path, hf = tiny_hf(arch, **over)
    if arch == "qwen2":  # the q/k/v biases are what makes Qwen2 differ: make them non-zero
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        hf.save_pretrained(path)
    return path, hf


def test_prefill_decode_verify_match_hf(pair):
    path, hf = pair
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m.vocab_size, (1, 24), generator=g)
    ref = hf_logits(hf, ids[0])  # [24, V]
    out = m.forward(ids[:, :16], torch.tensor([0]))[0]  # prefill 16
    assert (out - ref[:16]).abs().max() < TOL
    out = m.forward(ids[:, 16:17], torch.tensor([16]))[0]  # one-token decode
    assert (out - ref[16:17]).abs().max() < TOL
    out = m.forward(ids[:, 17:22], torch.tensor([17]))[0]  # 5-token verify at offset 17
    assert (out - ref[17:22]).abs().max() < TOL


def test_batch_rows_at_different_positions(pair):
    path, hf = pair
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3)
    g = torch.Generator().manual_seed(2)
    lens = [11, 4, 7]
    seqs = [torch.randint(0, m.vocab_size, (n + 6,), generator=g) for n in lens]
    last = m.prefill([s[:n] for s, n in zip(seqs, lens)])  # [3, V]
    for b, (s, n) in enumerate(zip(seqs, lens)):
        assert (last[b] - hf_logits(hf, s[:n])[-1]).abs().max() < TOL
    # a 4-token verify pass with every row at its own position
    block = torch.stack([s[n : n + 4] for s, n in zip(seqs, lens)])
    out = m.forward(block, torch.tensor(lens))
    for b, (s, n) in enumerate(zip(seqs, lens)):
        assert (out[b] - hf_logits(hf, s[: n + 4])[n : n + 4]).abs().max() < TOL
    # then a one-token decode with rows still apart
    step = torch.stack([s[n + 4 : n + 5] for s, n in zip(seqs, lens)])
    out = m.forward(step, torch.tensor(lens) + 4)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        assert (out[b, 0] - hf_logits(hf, s[: n + 5])[-1]).abs().max() < TOL


def test_greedy_sample_matches_hf_generate(tiny_hf):
    path, hf = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2)
    prompt = torch.tensor([[5, 17, 33, 2, 0, 8]])  # token id 0 is a real token, not padding
    out = m.sample(prompt, 20, temperature=0)
    # explicit attention_mask: HF would otherwise infer padding from pad_token_id and mask the real 0
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_ragged_batch_greedy_equals_rows_alone(tiny_hf):
    path, _ = tiny_hf("qwen2")
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42]]
    together = m.sample(prompts, 16, temperature=0)
    for b, p in enumerate(prompts):
        alone = m.sample([p], 16, temperature=0)
        assert together[b].tolist() == alone[0].tolist()
