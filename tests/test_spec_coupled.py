"""The coupled acceptor (spec/coupled.py): position-keyed race noise makes the sampled text a
function of the seed alone, the same for every k, k-policy and draft, equal to target-only race
sampling of that noise; the loop's output is exact (tier 3); breaking the noise's keying is caught
(tier 4); the noise is a pure function of (seed, row, position, token)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_helpers import EXACTNESS_SAMPLES

from verispec.model import SamplingParams, logits_to_probs
from verispec.spec import CoupledAcceptor, SpeculativeGenerator
from verispec.spec.checker import check_exactness
from verispec.spec.coupled import PositionalNoise, race
from verispec.testing import MarkovChainLM
from verispec.spec.randomness import AcceptorRandomness, SpeculativeRandomness

SAMPLES = EXACTNESS_SAMPLES  # sized by power (spec_helpers.py); the broken-noise pairings below have lambda / n >= 50


# ---- the noise ----------------------------------------------------------------------------------


def test_noise_is_a_pure_function_of_row_and_position():
    noise = PositionalNoise(seed=42, vocab_size=50, slots=4)
    rows = torch.tensor([0, 3])
    first = noise.exponentials(rows, torch.tensor([[5, 6, 7], [0, 1, 2]]))  # [2, 3, 50]
    # other positions evict the ring; asking again, in another order and batch, gives the same values
    noise.exponentials(torch.tensor([3, 0]), torch.tensor([[9, 10, 11, 12], [20, 21, 22, 23]]))
    again = noise.exponentials(torch.tensor([3]), torch.tensor([[2, 0, 1]]))[0]
    assert torch.equal(again, first[1][[2, 0, 1]])
    assert torch.equal(PositionalNoise(42, 50).compute(torch.tensor([0]), torch.tensor([6]))[0], first[0, 1])
    # different rows, positions and seeds give different noise
    assert not torch.equal(first[0, 0], first[1, 0])
    assert not torch.equal(first[0, 0], first[0, 1])
    assert not torch.equal(PositionalNoise(43, 50).compute(torch.tensor([0]), torch.tensor([5]))[0], first[0, 0])


def test_noise_is_exponential():
    e = PositionalNoise(seed=1, vocab_size=1000).compute(torch.arange(200), torch.arange(200)).double()  # 2e5 draws
    assert (e > 0).all()
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.02
    # P(E > 2) = e^-2; and the race winner is distributed as the weights
    assert abs((e > 2).double().mean().item() - torch.exp(torch.tensor(-2.0)).item()) < 0.003
    weights = torch.tensor([0.5, 0.3, 0.2, 0.0])
    noise = PositionalNoise(seed=2, vocab_size=4).compute(torch.zeros(50_000, dtype=torch.long), torch.arange(50_000))
    counts = torch.bincount(race(weights.expand(50_000, 4), noise), minlength=4).double() / 50_000
    assert torch.allclose(counts, weights.double(), atol=0.01) and counts[3] == 0


def test_noise_errors_name_the_problem():
    noise = PositionalNoise(seed=0, vocab_size=8, slots=3)
    with pytest.raises(ValueError, match="ring holds 3"):
        noise.exponentials(torch.tensor([0]), torch.tensor([[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"rows must be \[B\]"):
        noise.exponentials(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        noise.compute(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="vocab_size"):
        PositionalNoise(seed=0, vocab_size=0)
    rng = AcceptorRandomness(torch.Generator(), torch.Generator())
    with pytest.raises(ValueError, match="positional noise needs"):
        CoupledAcceptor()(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 8), torch.ones(1, 3, 8) / 8, rng)


def test_a_fourth_draw_keys_the_noise_and_leaves_the_three_streams_alone():
    plain, coupled = SpeculativeRandomness(9), SpeculativeRandomness(9, vocab_size=16)
    assert torch.equal(plain.draft_uniforms(2, 3), coupled.draft_uniforms(2, 3))
    assert torch.equal(plain.acceptor.uniforms(4), coupled.acceptor.uniforms(4))
    assert plain.acceptor.noise is None and coupled.acceptor.noise is not None
    assert coupled.acceptor.noise.seed != SpeculativeRandomness(10, vocab_size=16).acceptor.noise.seed


# ---- the text does not depend on k, policy or draft ---------------------------------------------


def _reference(target, prompts, sequence_length, params, seed):
    """Target-only race sampling of the run's noise, written without the speculative loop: each
    token from a forward over the whole sequence so far, at position n, argmax p / E[row, n]."""
    noise = SpeculativeRandomness(seed, vocab_size=target.vocab_size).acceptor.noise
    out = []
    for row, p in enumerate(prompts):
        seq = p.clone()
        while len(seq) < sequence_length:
            if hasattr(target, "reset"):
                target.reset()
            logits = target.forward(seq[None], torch.zeros(1, dtype=torch.long),
                                    logits_at=torch.tensor([[len(seq) - 1]]))[:, 0]
            e = noise.compute(torch.tensor([row]), torch.tensor([len(seq)]))
            seq = torch.cat([seq, race(logits_to_probs(logits, params), e)])
        out.append(seq)
    return out


def test_coupled_text_is_the_same_for_every_k_policy_and_draft_on_toy_chains():
    V = 7
    target = MarkovChainLM.random(V, 3, order=2, n_positions=64, batch_size=4)
    draft = MarkovChainLM.random(V, 4, order=2, n_positions=64, batch_size=4)
    prompts = torch.tensor([[0, 1], [2, 3], [1, 1], [4, 0]])
    params = SamplingParams(0.9, None, 0.95)
    expected = torch.stack(_reference(target, list(prompts), 40, params, seed=5))
    rates = []
    for k in (1, 2, 4, 6, "auto"):
        for d in (draft, "ngram", "self:1"):
            gen = SpeculativeGenerator(d, target, k, acceptor="coupled", measure_decode_step=False)
            out = gen.generate(prompts, 40, 0.9, None, 0.95, seed=5)
            assert torch.equal(out.tokens, expected), (k, d)
            rates.append(out.stats.acceptance_rate)
    other = SpeculativeGenerator(draft, target, 4, acceptor="coupled").sample(prompts, 40, 0.9, None, 0.95, seed=6)
    assert not torch.equal(other, expected)  # the seed does matter
    assert max(r for r in rates if r is not None) > 0.3  # drafts were accepted, not all rejected


@pytest.fixture(scope="module")
def tiny_llamas(tiny_trio):
    return tiny_trio["target"], tiny_trio["twin"], tiny_trio["other"]


def test_coupled_text_is_the_same_for_every_k_and_draft_on_tiny_llamas(tiny_llamas):
    target, twin, other = tiny_llamas
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (5, 11, 2)]  # ragged batch of 3
    seq_len = 11 + 30
    expected = SpeculativeGenerator(None, target, 1, acceptor="coupled").sample(prompts, seq_len, 0.8, seed=11)
    reference = _reference(target, prompts, seq_len, SamplingParams(0.8), seed=11)
    for row, ref in enumerate(reference):
        assert torch.equal(expected[row, : len(ref)], ref)
    # target-only sampling on the same noise (LlamaForSampling.sample / stream, coupled=True)
    assert torch.equal(target.sample(prompts, seq_len, 0.8, seed=11, coupled=True), expected)
    streamed = {b: [] for b in range(3)}
    for step in target.stream(prompts, seq_len, 0.8, seed=11, coupled=True):
        for b, toks in step.items():
            streamed[b].extend(toks)
    for b, p in enumerate(prompts):
        assert streamed[b] == expected[b, len(p):].tolist()
    assert not torch.equal(target.sample(prompts, seq_len, 0.8, seed=11), expected)  # the plain sampler differs
    for d, k in ((twin, 5), (other, 3), ("self:1", 4), ("ngram", 6), (other, "auto"), (twin, "auto:6")):
        gen = SpeculativeGenerator(d, target, k, acceptor="coupled")
        assert torch.equal(gen.sample(prompts, seq_len, 0.8, seed=11), expected), (d, k)
        if d is twin:  # the same weights and the same noise: every draft matches
            assert gen.last_stats.acceptance_rate == 1.0


# ---- tiers 3 and 4 ------------------------------------------------------------------------------


@st.composite
def cases(draw):
    V = draw(st.integers(4, 8))
    order = draw(st.sampled_from([1, 2]))
    seed = draw(st.integers(0, 2**20))
    return dict(vocab=V, order=order, seed=seed, length=4 if V <= 6 else 3,
                temperature=draw(st.sampled_from([0.5, 1.0, 1.5])),
                top_k=draw(st.one_of(st.none(), st.integers(1, V))),
                top_p=draw(st.one_of(st.none(), st.sampled_from([0.5, 0.8, 0.95]))))


@pytest.mark.parametrize("draft,k", [("model", 1), ("model", 3), ("model", 6), ("ngram", 4), ("self:1", 5),
                                     ("model", "auto")])
@settings(derandomize=True, max_examples=2, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_coupled_acceptor_is_exact(draft, k, case):
    report = check_exactness("coupled", draft, k, samples=SAMPLES, **case)
    assert report.passed and report.p_value >= 1e-6, report.format()


def test_noise_shared_across_positions_is_caught(monkeypatch):
    # the same noise at every position: each row's tokens become dependent; the checker must fail
    real = PositionalNoise.compute
    monkeypatch.setattr(PositionalNoise, "compute", lambda self, rows, positions: real(self, rows, positions * 0))
    report = check_exactness("coupled", "model", 3, samples=SAMPLES, vocab=5, length=4, temperature=1.0, seed=4)
    assert not report.passed and report.p_value < 1e-30, report.format()


def test_noise_shared_across_rows_is_caught(monkeypatch):
    # every row of the batch drawing the same noise: all samples equal
    real = PositionalNoise.compute
    monkeypatch.setattr(PositionalNoise, "compute", lambda self, rows, positions: real(self, rows * 0, positions))
    report = check_exactness("coupled", "model", 3, samples=SAMPLES, vocab=5, length=4, temperature=1.0, seed=4)
    assert not report.passed and report.p_value < 1e-30, report.format()
