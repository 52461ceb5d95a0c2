"""A whole model through the NKI kernels (interpreted here): ``kernel_backend="nki"`` gives the
torch backend's logits and the same greedy tokens, and a token-tree step (verify a tree, move the
accepted path with kv_gather, decode on) gives what feeding the path itself gives."""

from __future__ import annotations

import pytest
import torch

from verispec.kernels import reference
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


def test_tree_verify_then_kv_gather_then_decode(tiny_hf):
    """Verify a 4-node tree per row (parents 0 <- 1, 0 <- 2, 1 <- 3), keep one root-to-leaf path
    with the NKI kv_gather in every layer, decode the next token: the logits are those of a model
    that was fed the accepted path as plain tokens."""
    path, _ = tiny_hf("llama")
    ref, nki = _pair(path, n_positions=32, batch_size=2)
    plain = LlamaForSampling.from_pretrained(path, kernel_backend="torch", n_positions=32, batch_size=2)
    prompts = [torch.tensor([5, 9, 2, 77, 3]), torch.tensor([11, 4, 8])]
    for m in (ref, nki, plain):
        m.prefill(prompts)
    pos = torch.tensor([5, 3])
    tree_ids = torch.tensor([[21, 22, 23, 24], [31, 32, 33, 34]])  # [B, 4]
    parent, depth = [-1, 0, 0, 1], torch.tensor([0, 1, 1, 2])
    mask = torch.eye(4, dtype=torch.bool)
    for t in range(1, 4):
        mask[t] |= mask[parent[t]]
    mask = mask.expand(2, 4, 4)
    kept = [[0, 2], [0, 1, 3]]  # the accepted path of each row
    for m in (ref, nki):
        m.forward(tree_ids, pos, active_mask=mask, position_ids=pos[:, None] + depth)
    src = torch.tensor([[p + n for n in k] + [0] * (3 - len(k)) for p, k in zip(pos.tolist(), kept)])  # [B, 3]
    counts = torch.tensor([len(k) for k in kept])
    gather = nki.kernels.get("kv_gather")
    for i in range(len(nki.cache.k)):
        gather(nki.cache.k[i][:2], nki.cache.v[i][:2], src, pos, counts)
        reference.kv_gather(ref.cache.k[i][:2], ref.cache.v[i][:2], src, pos, counts)
    # the plain model: each row's path as ordinary tokens at the same slots (row 0's path is shorter)
    plain.forward(torch.tensor([[21, 23, 0], [31, 32, 34]]), pos)
    nxt, nxt_pos = torch.tensor([[40], [41]]), pos + counts
    want = plain.forward(nxt, nxt_pos)
    torch.testing.assert_close(nki.forward(nxt, nxt_pos), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.forward(nxt, nxt_pos), want, rtol=1e-4, atol=1e-4)


def test_tree_steps_through_the_nki_kernels_equal_target_greedy(tiny_hf):
    """The speculative loop with a token tree on kernel_backend="nki": draft and target verify-attention
    with tree masks, kv_gather in both caches; at temperature 0 the text is target-only greedy."""
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama")
    other, _ = tiny_hf("llama", seed=1, num_hidden_layers=1)
    kw = dict(n_positions=48, batch_size=2)
    ref = LlamaForSampling.from_pretrained(path, kernel_backend="torch", **kw)
    target = LlamaForSampling.from_pretrained(path, kernel_backend="nki", **kw)
    draft = LlamaForSampling.from_pretrained(other, kernel_backend="nki", **kw)
    prompts = [torch.tensor([5, 9, 2, 77, 3]), torch.tensor([11, 4, 8])]
    expected = ref.sample(prompts, 5 + 8, temperature=0)
    gen = SpeculativeGenerator(draft, target, tree=[2, 1], children="top")
    assert torch.equal(gen.sample(prompts, 5 + 8, temperature=0), expected)
    assert gen.last_stats.tree_passes > 0
