"""A whole model through the NKI kernels (interpreted here): ``kernel_backend="nki"`` gives the
torch backend's logits and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from verispec.model import LlamaForSampling


def _pair(path, **kw):
    ref = LlamaForSampling.from_pretrained(path, kernel_backend="torch", **kw)
    nki = LlamaForSampling.from_pretrained(path, kernel_backend="nki", **kw)
    assert nki.kernels.name == "nki" and nki.kernels.fallbacks == ()
    return ref, nki


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_logits_equal_torch_backend(tiny_hf, arch):
    path, _ = tiny_hf(arch)
    ref, nki = _pair(path, n_positions=64, batch_size=2)
    prompts = [torch.tensor([5, 9, 2, 77, 3, 0, 41]), torch.tensor([11, 4])]
    torch.testing.assert_close(nki.prefill(prompts), ref.prefill(prompts), rtol=1e-5, atol=1e-5)
    # a verify pass: 4 tokens per row, the rows at different cache positions
    ids, pos = torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9]]), torch.tensor([7, 2])
    torch.testing.assert_close(nki.forward(ids, pos), ref.forward(ids, pos), rtol=1e-5, atol=1e-5)
    # a token tree over the same slots: each token sees itself and a random subset before it
    tree = torch.tril(torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5) | torch.eye(4, dtype=torch.bool)
    got, want = nki.forward(ids, pos, active_mask=tree), ref.forward(ids, pos, active_mask=tree)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tiny_model_greedy_tokens_identical(tiny_hf):
    path, _ = tiny_hf("llama")
    ref, nki = _pair(path, n_positions=48, batch_size=2)
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    want = ref.sample(prompts, sequence_length=24, temperature=0.0)
    got = nki.sample(prompts, sequence_length=24, temperature=0.0)
    assert torch.equal(got, want)


def test_tiny_model_bf16_logits_close(tiny_hf):
    path, _ = tiny_hf("llama")
    ref, nki = _pair(path, n_positions=32, batch_size=1, amp="bf16")
    prompt = [torch.tensor([7, 1, 30, 2, 60, 5])]
    a, b = ref.prefill(prompt), nki.prefill(prompt)
    # both attend in bf16 with an fp32 softmax; they differ only in rounding order
    assert (a - b).abs().max() < 0.05 * a.abs().max()
