"""The loop's bookkeeping on toy chains: streaming, per-row stop and EOS, rows leaving the batch,
draft-cache holes, n-gram lookup, statistics and the speedup formula."""

import pytest
import torch

from verispec.spec import (
    SpeculativeGenerator,
    SpeculativeRandomness,
    ngram_lookup,
    predicted_speedup,
)
from verispec.testing import MarkovChainLM


def chain(seed, V=6, order=2, B=8, n_positions=48):
    return MarkovChainLM.random(V, seed, order=order, n_positions=n_positions, batch_size=B)


class RecordingChain(MarkovChainLM):
    """Records the number of rows of every forward call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows_seen = []

    def forward(self, input_ids, positions, *a, **kw):
        self.rows_seen.append(input_ids.shape[0])
        return super().forward(input_ids, positions, *a, **kw)


def test_stream_yields_what_sample_returns():
    target, draft = chain(0), chain(1)
    prompts = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([0, 0, 5])]
    gen = SpeculativeGenerator(draft, target, 4)
    out = gen.sample(prompts, 20, seed=3)
    rows = {b: p.tolist() for b, p in enumerate(prompts)}
    steps = list(gen.stream(prompts, 20, seed=3))
    assert steps[0].counts.tolist() == [1, 1, 1]  # the first token comes from the prefill
    for step in steps:
        for b, toks in step.per_row().items():
            rows[b] += toks
    assert [rows[b] for b in range(3)] == out.tolist()
    assert max(int(s.counts.max()) for s in steps[1:]) <= 4


def test_rows_stop_at_sequence_length_and_finished_rows_leave_the_batch():
    target = RecordingChain(chain(0, B=3).layer_logits, order=2, n_positions=48, batch_size=3)
    prompts = [torch.tensor([1] * 2), torch.tensor([1] * 10), torch.tensor([2] * 12)]
    out = SpeculativeGenerator(chain(1, B=3), target, 3).sample(prompts, 12, seed=0)
    assert out.shape == (3, 12)
    assert out[2].tolist() == [2] * 12  # a prompt that fills the sequence is returned as is
    assert target.rows_seen[0] == 3  # prefill
    verify = target.rows_seen[1:]
    assert verify[0] == 2 and verify[-1] == 1  # row 2 never decodes; row 1 leaves after 2 tokens
    assert verify == sorted(verify, reverse=True)


def test_eos_ends_rows_and_fills_after_it():
    V, eos = 5, 3
    target = MarkovChainLM.random(V, 2, order=1, sharpness=0.3, n_positions=40, batch_size=64)
    out = SpeculativeGenerator(chain(1, V=V, order=1, B=64, n_positions=40), target, 4).sample(
        torch.zeros(64, 1, dtype=torch.long), 30, seed=1, eos_token_id=eos)
    ended = 0
    for row in out.tolist():
        if eos in row[1:]:
            first = row.index(eos, 1)
            assert all(t == eos for t in row[first:])
            ended += 1
    assert ended > 40  # p(eos) is about 1/5 per token: nearly every row meets it in 29 tokens


@pytest.mark.parametrize("k", [2, 5])
def test_a_draft_equal_to_the_target_accepts_everything(k):
    """Same order-2 chain as a separate draft model: q = p, so every draft is accepted; this holds
    only if the draft's cache is refilled correctly after fully accepted steps (the hole)."""
    target = chain(4, B=16)
    draft = MarkovChainLM(target.layer_logits, order=2, n_positions=48, batch_size=16)
    gen = SpeculativeGenerator(draft, target, k)
    gen.sample(torch.zeros(16, 2, dtype=torch.long), 40, seed=0, top_k=4)
    stats = gen.last_stats
    assert stats.acceptance_rate == 1.0
    assert stats.histogram[k - 1] == 16 * stats.k_counts[k]  # every full-k pass kept all k - 1 drafts


class Cycle:
    max_k = 6

    def __init__(self, ks):
        self.ks, self.i = ks, -1

    def next_k(self):
        self.i += 1
        return self.ks[self.i % len(self.ks)]

    def observe(self, k, accepted, draft_s, target_s):
        pass


def test_draft_cache_catches_up_after_k1_steps():
    target = chain(4, B=4)
    draft = MarkovChainLM(target.layer_logits, order=2, n_positions=48, batch_size=4)
    gen = SpeculativeGenerator(draft, target, Cycle([1, 1, 1, 5, 1, 3]))
    gen.sample(torch.zeros(4, 2, dtype=torch.long), 40, seed=0)
    assert gen.last_stats.acceptance_rate == 1.0
    assert set(gen.last_stats.k_counts) >= {1, 3, 5}


def test_self_draft_with_all_layers_accepts_everything():
    target = chain(5, B=8)
    gen = SpeculativeGenerator("self:2", target, 4)
    gen.sample(torch.zeros(8, 1, dtype=torch.long), 30, seed=0)
    assert gen.last_stats.acceptance_rate == 1.0


def test_ngram_lookup_by_hand():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 0, 0, 0],  # suffix [1, 2] seen at 0 -> 3, 1, 2
                           [4, 4, 4, 4, 0, 0, 0, 0],  # suffix [4, 4, 4] at 0 -> 4, then history ends
                           [5, 6, 7, 0, 0, 0, 0, 0],  # no earlier match: repeat the last token
                           [7, 1, 2, 7, 9, 7, 0, 0]])  # 3- and 2-grams miss; [7] latest at 3 -> 9, 7, 7
    lengths = torch.tensor([5, 4, 3, 6])
    assert ngram_lookup(tokens, lengths, 3, 3, 1).tolist() == [[3, 1, 2], [4, 4, 4], [7, 7, 7], [9, 7, 7]]
    assert ngram_lookup(tokens, lengths, 0, 3, 1).shape == (4, 0)


def test_statistics_are_consistent():
    target, draft = chain(0, B=32), chain(1, B=32)
    result = SpeculativeGenerator(draft, target, 4).generate(torch.zeros(32, 2, dtype=torch.long), 30, seed=0)
    s = result.stats
    assert result.tokens.shape == (32, 30)
    assert s.new_tokens == 32 * 28
    assert sum(s.histogram) == s.row_passes and len(s.histogram) == 4
    assert s.accepted_drafts == sum(a * n for a, n in enumerate(s.histogram))
    assert s.acceptance_rate == s.accepted_drafts / s.proposed_drafts
    assert s.mean_tokens_per_pass == pytest.approx(1 + s.accepted_drafts / s.row_passes)
    d = s.to_dict()
    for key in ("acceptance_rate", "mean_tokens_per_pass", "position_acceptance", "accepted_histogram", "tokens_per_s",
                "draft_s", "target_s", "predicted_speedup", "measured_speedup", "c", "r", "decode_step_s"):
        assert key in d and d[key] is not None, key
    assert s["acceptance_rate"] == d["acceptance_rate"]


def test_per_position_acceptance_by_hand():
    from verispec.spec import SpecStats

    s = SpecStats()
    s.record(4, torch.tensor([0, 3, 1, 3, 2]))  # g = 3
    assert s.histogram == [1, 1, 1, 2]
    assert s.reached == [5, 4, 3] and s.kept == [4, 3, 2]
    assert s.position_acceptance == [0.8, 0.75, pytest.approx(2 / 3)]
    s.record(2, torch.tensor([1, 0]))  # a shorter pass (g = 1) adds to the first position only
    assert s.reached == [7, 4, 3] and s.kept == [5, 3, 2] and s.histogram == [2, 2, 1, 2]
    assert s.acceptance_rate == (9 + 1) / (15 + 2)
    assert s.mean_tokens_per_pass == pytest.approx((10 + 7) / 7)


def test_predicted_speedup_formula():
    # (1 - .5^3) / ((1 - .5)(.1 * 2 + 1)) = .875 / .6
    assert predicted_speedup(0.5, 3, 0.1, 1.0) == pytest.approx(0.875 / 0.6)
    assert predicted_speedup(1.0, 4, 0.0, 1.0) == 4.0  # the a -> 1 limit is k
    assert predicted_speedup(0.0, 5, 0.0, 1.25) == pytest.approx(0.8)


def test_random_streams_are_separate():
    a, b = SpeculativeRandomness(9), SpeculativeRandomness(9)
    a.acceptor.uniforms(100)  # drawing accept uniforms does not move the race stream
    assert torch.equal(a.acceptor.exponentials(4, 5), b.acceptor.exponentials(4, 5))
    e = SpeculativeRandomness(1).acceptor.exponentials(100_000)
    assert bool((e > 0).all()) and abs(float(e.mean()) - 1) < 0.02


def test_a_draft_stopped_by_the_gate_keeps_its_cache_in_step(tiny_hf):
    """ModelDraft stops where ``keep`` says (after 2 of 5 drafts here); after the target accepts
    both and adds one token, the next proposal continues the draft's own greedy text exactly, so
    the cache bookkeeping after an early stop is right."""
    from verispec.model import LlamaForSampling
    from verispec.model.sampling import SamplingParams
    from verispec.spec.drafts import ModelDraft

    path, _ = tiny_hf("llama", seed=4)
    model = LlamaForSampling.from_pretrained(path, n_positions=64, amp="f32")
    draft = ModelDraft(model)
    prompt = torch.tensor([5, 3, 8, 1])
    draft.prefill([prompt])
    greedy, heard = SamplingParams(0.0), []
    reference = LlamaForSampling.from_pretrained(path, n_positions=64, amp="f32")
    text = reference.sample(prompt[None], 4 + 8, temperature=0)[0]
    tokens = torch.zeros(1, 40, dtype=torch.long)
    tokens[0, :5] = text[:5]  # the prompt and the first token (the target's prefill makes it)
    keep = lambda conf: heard.append(float(conf[0])) or len(heard) < 2  # noqa: E731
    ids, probs = draft.propose(tokens, torch.tensor([5]), 5, greedy, torch.zeros(1, 5, dtype=torch.float64), keep=keep)
    assert ids.shape == (1, 2) and probs.shape == (1, 2, model.vocab_size) and len(heard) == 2
    assert all(0 < c <= 1 for c in heard)
    assert ids[0].tolist() == text[5:7].tolist()
    tokens[0, 5:7], tokens[0, 7] = ids[0], 7  # both accepted, then the target's own token 7
    draft.commit(torch.tensor([2]), torch.tensor([8]))
    uniforms = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    ids, probs = draft.propose(tokens, torch.tensor([8]), 3, SamplingParams(1.0), uniforms)
    text = torch.cat([tokens[:, :8], ids], 1)  # [1, 11]
    logits = reference.forward(text, torch.zeros(1, dtype=torch.long), logits_at=torch.tensor([[7, 8, 9]]))[0]
    torch.testing.assert_close(probs[0], logits.float().softmax(-1), rtol=1e-4, atol=1e-6)
