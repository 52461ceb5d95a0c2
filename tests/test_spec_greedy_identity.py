"""Tier 5: at temperature 0 in fp32, speculative output is token for token the target's own
greedy output (LlamaForSampling.sample), for every draft kind and lossless acceptor, batch 1
and batch 3 with prompts of different lengths, EOS included."""

import pytest
import torch

from verispec.spec import SpeculativeGenerator

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def models(tiny_trio):
    return tiny_trio


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("lengths", [(7,), (5, 11, 2)], ids=["batch1", "batch3-ragged"])
@pytest.mark.parametrize(
    "draft,acceptor,k",
    [("self:1", None, 4), ("ngram", None, 5), ("ngram", "sample-match", 3), ("other", None, 3),
     ("twin", "greedy", 6), ("self:1", "sample-match", 2), ("other", None, "auto"), ("twin", None, "auto:6")],
)
def test_speculative_greedy_equals_target_greedy(models, lengths, draft, acceptor, k):
    target = models["target"]
    ps = prompts(lengths)
    seq_len = max(lengths) + NEW_TOKENS
    expected = target.sample(ps, seq_len, temperature=0)
    gen = SpeculativeGenerator(models.get(draft, draft), target, k, acceptor=acceptor)
    out = gen.sample(ps, seq_len, temperature=0, seed=123)
    assert torch.equal(out, expected)
    if draft == "twin":  # the same weights as a separate draft: every draft accepted, so no cache hole
        assert gen.last_stats.acceptance_rate == 1.0


@pytest.mark.parametrize("draft,k", [("other", 4), ("ngram", 3), ("self:1", 6)])
def test_greedy_id_decisions_equal_the_acceptor_kernels(models, draft, k):
    """At temperature 0 the stock acceptors decide from the target's argmax ids (no [B, k, V]
    distributions, no random numbers): the same tokens and the same accepted drafts, pass by
    pass, as running DefaultTokenAcceptor's rejection kernel on the one-hot distributions."""
    from verispec.spec.acceptors import DefaultTokenAcceptor

    target, ps = models["target"], prompts((5, 11, 2), seed=2)
    runs = []
    for by_ids in (True, False):
        gen = SpeculativeGenerator(models.get(draft, draft), target, k)
        assert gen._greedy_ids_accept and isinstance(gen.acceptor, DefaultTokenAcceptor)
        gen._greedy_ids_accept = by_ids
        out = gen.sample(ps, 11 + 40, temperature=0, seed=9)
        s = gen.last_stats
        runs.append((out, s.accepted_drafts, s.proposed_drafts, dict(s.k_counts), list(s.histogram), list(s.kept)))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert runs[0][2] > 0


def test_greedy_keeps_calling_a_users_acceptor_or_kernel(models):
    """The id shortcut is the stock acceptors' only: a DefaultTokenAcceptor with another kernel,
    and a subclass, are still called at temperature 0 (and give the target's greedy text)."""
    from verispec.spec.acceptors import DefaultTokenAcceptor
    from verispec.spec.rejection import rejection_sample

    target, ps = models["target"], prompts((6, 3), seed=4)
    expected = target.sample(ps, 30, temperature=0)
    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return rejection_sample(*args)

    class Mine(DefaultTokenAcceptor):
        def __call__(self, *args):
            calls.append("subclass")
            return super().__call__(*args)

    for acceptor in (DefaultTokenAcceptor(kernel), Mine()):
        calls.clear()
        gen = SpeculativeGenerator(models["other"], target, 3, acceptor=acceptor)
        assert not gen._greedy_ids_accept
        assert torch.equal(gen.sample(ps, 30, temperature=0, seed=1), expected)
        assert len(calls) >= 10  # the prefill's token and every verify pass


def test_greedy_identity_with_eos(models):
    target = models["target"]
    ps = prompts((4, 9, 6), seed=5)
    seq_len = 9 + 40
    free = target.sample(ps, seq_len, temperature=0)
    eos = int(free[0, 4 + 10])  # a token row 0 really produces: it must stop there
    expected = target.sample(ps, seq_len, temperature=0, eos_token_id=eos)
    out = SpeculativeGenerator("self:1", target, 4).sample(ps, seq_len, temperature=0, eos_token_id=eos)
    assert torch.equal(out, expected)
    first = (out[0, 4:] == eos).nonzero()[0, 0] + 4
    assert (out[0, first:] == eos).all()


def test_sampling_with_the_same_seed_is_reproducible(models):
    target = models["target"]
    ps = prompts((6, 3))
    gen = SpeculativeGenerator(models["other"], target, 3)
    a = gen.sample(ps, 30, temperature=1.0, top_p=0.9, seed=7)
    b = gen.sample(ps, 30, temperature=1.0, top_p=0.9, seed=7)
    c = gen.sample(ps, 30, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def smollm2(smollm2_f32):
    """SmolLM2-135M-Instruct in fp32 (conftest: one load for the session)."""
    model = smollm2_f32
    tok = model.tokenizer
    questions = ["Write a Python function that checks whether a string is a palindrome.",
                 "What is the capital of France? Answer in one sentence.",
                 "List three prime numbers and explain why they are prime."]
    chats = [torch.tensor(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)) for q in questions]
    assert len({len(c) for c in chats}) == 3  # three different prompt lengths
    return model, chats


@pytest.mark.slow
@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["prompt0", "prompt1", "batch3-ragged"])
def test_smollm2_speculative_greedy_equals_target_greedy(smollm2, rows):
    model, chats = smollm2
    ps = [chats[i] for i in rows]
    seq_len = max(len(p) for p in ps) + NEW_TOKENS
    expected = model.sample(ps, seq_len, temperature=0)
    for draft in ("self:8", "ngram"):
        gen = SpeculativeGenerator(draft, model, 4)
        out = gen.sample(ps, seq_len, temperature=0)
        assert torch.equal(out, expected), (draft, rows)
        assert gen.last_stats.proposed_drafts > 0
