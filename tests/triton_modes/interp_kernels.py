"""The triton backend's verify_attention, kv_append and kv_gather on Triton's CPU interpreter.

Run by tests/test_triton_modes.py in a child process started with TRITON_INTERPRET=1 (Triton
fixes its mode when it is first imported, so the variable cannot be set for some tests only).
"""

from __future__ import annotations

import pytest
import torch

from verispec.kernels import reference
from test_kv_gather_backends import assert_same_errors, run_random_cases  # tests/, on sys.path for its conftest
from verispec.kernels.testing import (AttnCase, check_backend, default_append_cases, default_attention_cases,
                                      default_gather_cases)
from verispec.kernels.triton import interpreting, kv_append, kv_gather, verify_attention


@pytest.fixture(autouse=True)
def _check_interpreter_mode():
    assert interpreting(), "run this file with TRITON_INTERPRET=1 set before triton is imported"


# bf16 on the interpreter: the quick list (ratio 1, decode with rows apart, ratio 7 at T = 5 in 3
# slices, T = 16 at D = 128 past slot 1024, a 37-token MQA prefill, a token tree at D = 128) and
# the full list's cases that reach the other bf16 tiles: BLOCK_M 32 at D = 64 (T = 9), a tree at
# ratio 7 with BLOCK_M 64 at D = 128, and a 130-token prefill over several 128-row query tiles.
# Every other full-list case runs in fp32 below (the interpreter spends ~40 ms per key block, and
# the bf16 pass over the full list doubled the file's time); the fp16 test adds two more.
BF16_EXTRA = [AttnCase(1, 4, 2, 9, 64, (509,), 526), AttnCase(2, 14, 2, 8, 128, (300, 1000), 1024, True),
              AttnCase(1, 2, 1, 130, 64, (3,), 140)]


def test_conformance_fp32_bf16():
    # fp32, the full default case list: T 1..16, 37 and 130, GQA 1/2/7, D 64/128, unaligned cache
    # lengths, rows at different positions, token trees, last cache slot, long caches in slices
    report = check_backend("triton", dtypes=(torch.float32,))
    assert report.passed, str(report)
    assert len(report.results) >= 30
    full = default_attention_cases()
    bf16_cases = default_attention_cases(quick=True) + BF16_EXTRA
    assert all(c in full for c in bf16_cases)  # a subset of the list, not cases of its own
    report = check_backend("triton", dtypes=(torch.bfloat16,), attention_cases=bf16_cases)
    assert report.passed, str(report)
    assert len(report.results) == len(bf16_cases) + 2 * len(default_append_cases()) + 2 * len(default_gather_cases())
    assert "kv_gather" not in report.skipped


def test_conformance_fp16():
    cases = [AttnCase(2, 14, 2, 5, 64, (300, 7), 320), AttnCase(1, 4, 1, 16, 128, (1000,), 1016, True)]
    report = check_backend("triton", dtypes=(torch.float16,), attention_cases=cases, append_cases=[])
    assert report.passed, str(report)


def _inputs(B, H, H_kv, T, D, S_max, positions, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)  # [B, H, T, D]
    k = torch.randn(B, H_kv, S_max, D, generator=gen).to(dtype)  # [B, H_kv, S_max, D]
    v = torch.randn(B, H_kv, S_max, D, generator=gen).to(dtype)
    return q, k, v, torch.tensor(positions)


@pytest.mark.parametrize("tree", [False, True])
def test_every_split_count_gives_the_same_answer(tree):
    # rows far apart: some slices are empty for the short row, and slice edges fall inside the active block
    q, k, v, pos = _inputs(2, 6, 2, 7, 64, 900, (850, 40), torch.float32)
    mask = None
    if tree:
        gen = torch.Generator().manual_seed(1)
        mask = torch.tril(torch.rand(2, 7, 7, generator=gen) < 0.5) | torch.eye(7, dtype=torch.bool)
    truth = reference.verify_attention(q.double(), k.double(), v.double(), pos, 0.125, mask)
    for splits in (1, 2, 3, 4):
        out = verify_attention(q, k, v, pos, 0.125, mask, num_splits=splits)
        err = (out.double() - truth).abs().max().item()
        assert err < 2e-6, f"num_splits={splits}: max error {err}"


def test_non_contiguous_inputs_and_int64_positions():
    # the decoder passes q as a transposed view of [B, T, H, D]
    B, H, H_kv, T, D = 2, 4, 2, 3, 32
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2)  # [B, H, T, D], strided
    k = torch.randn(B, H_kv, 50, D, generator=gen)
    v = torch.randn(B, 50, H_kv, D, generator=gen).transpose(1, 2)  # [B, H_kv, S_max, D], strided
    pos = torch.tensor([20, 47], dtype=torch.int64)
    out = verify_attention(q, k, v, pos, D**-0.5)
    truth = reference.verify_attention(q.double(), k.double(), v.double(), pos, D**-0.5)
    assert out.shape == (B, H, T, D) and out.dtype == torch.float32
    assert (out.double() - truth).abs().max().item() < 2e-6
    # kv_append into a strided cache from a strided block
    k_new = torch.randn(B, T, H_kv, D, generator=gen).transpose(1, 2)  # [B, H_kv, T, D]
    v_new = torch.randn(B, T, H_kv, D, generator=gen).transpose(1, 2)
    pos = torch.tensor([0, 47], dtype=torch.int64)
    ek, ev = k.clone(), v.clone()
    reference.kv_append(ek, ev, k_new, v_new, pos)
    kv_append(k, v, k_new, v_new, pos)
    assert torch.equal(k, ek) and torch.equal(v, ev)


def test_small_head_dim_and_single_slot():
    q, k, v, pos = _inputs(1, 3, 3, 1, 8, 1, (0,), torch.float32)  # D = 8 pads to the 16-wide tile
    out = verify_attention(q, k, v, pos, 1.0)
    # one visible slot: softmax weight 1, the output is that slot's value row for every head
    assert torch.allclose(out[0, :, 0], v[0, :, 0], atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    q, k, v, pos = _inputs(2, 4, 2, 2, 16, 10, (3, 8), torch.float32)
    with pytest.raises(IndexError, match="row 1"):
        verify_attention(q, k, v, torch.tensor([3, 9]), 0.25)  # 9 + 2 > 10 slots
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        verify_attention(q.double(), k.double(), v.double(), pos, 0.25)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        verify_attention(q, k.bfloat16(), v.bfloat16(), pos, 0.25)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        verify_attention(q[:, :3], k, v, pos, 0.25)
    with pytest.raises(IndexError, match="out of range"):
        kv_append(k, v, k[:, :, :2], v[:, :, :2], torch.tensor([-1, 0]))


def test_kv_gather_matches_the_reference():
    # overlapping sources and destinations, rows that move nothing, B up to 3, fp32 and bf16,
    # int32 and int64 slots, a strided V cache: exactly the reference's caches
    assert run_random_cases(kv_gather) == 48


def test_kv_gather_errors_are_the_references():
    assert_same_errors(kv_gather)


def test_tiny_model_logits_match_torch_backend(tiny_hf):
    """Prefill, a T=5 verify pass and a decode step through the decoder: same logits as torch."""
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("qwen2", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    models = {name: LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, kernel_backend=name)
              for name in ("torch", "triton")}
    assert models["triton"].kernels.name == "triton"
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (2, 9), generator=gen)
    block = torch.randint(0, 97, (2, 5), generator=gen)
    step = torch.randint(0, 97, (2, 1), generator=gen)
    logits = {}
    for name, m in models.items():
        a = m.forward(prompt, torch.tensor([0, 0]))
        b = m.forward(block, torch.tensor([9, 4]))  # rows at different positions
        c = m.forward(step, torch.tensor([14, 6]))
        logits[name] = (a, b, c)
    for x, y in zip(logits["torch"], logits["triton"]):
        assert (x - y).abs().max().item() < 1e-4


def test_tree_steps_through_the_triton_kernels_equal_target_greedy(tiny_hf):
    """The speculative loop with a token tree on kernel_backend="triton" (interpreted): tree-mask
    verify attention in draft and target, kv_gather in both caches; at temperature 0 the text is
    target-only greedy on the torch backend."""
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama")
    other, _ = tiny_hf("llama", seed=1, num_hidden_layers=1)
    kw = dict(n_positions=32, batch_size=2)
    ref = LlamaForSampling.from_pretrained(path, kernel_backend="torch", **kw)
    target = LlamaForSampling.from_pretrained(path, kernel_backend="triton", **kw)
    draft = LlamaForSampling.from_pretrained(other, kernel_backend="triton", **kw)
    assert target.kernels.get("kv_gather") is kv_gather
    prompts = [torch.tensor([5, 9, 2, 77, 3]), torch.tensor([11, 4, 8])]
    expected = ref.sample(prompts, 5 + 6, temperature=0)
    gen = SpeculativeGenerator(draft, target, tree=[2, 1], children="top")
    assert torch.equal(gen.sample(prompts, 5 + 6, temperature=0), expected)
    assert gen.last_stats.tree_passes > 0
