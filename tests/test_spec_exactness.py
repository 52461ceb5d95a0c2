"""Tiers 3 and 4: the whole speculative loop, run on 4 x 10^4 identical prompts in one batch of toy
Markov-chain models, has exactly the target-only joint distribution of the next L tokens
(chi-square against full enumeration, fail if p < 1e-6); and the same harness fails, by a
wide margin, for deliberately biased pairings. Hypothesis draws the chains (derandomized)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_helpers import EXACTNESS_SAMPLES

from verispec.spec.checker import check_exactness
from verispec.testing import MarkovChainLM

SAMPLES = EXACTNESS_SAMPLES  # sized by power: see spec_helpers.py (the argmax-softq k=4 test below is the bound)
SETTINGS = settings(derandomize=True, max_examples=2, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    """A target chain, a different draft chain, and sampling parameters."""
    V = draw(st.integers(4, 8))
    order = draw(st.sampled_from([1, 2]))
    sharp_t, sharp_d = draw(st.sampled_from([0.7, 1.5, 3.0])), draw(st.sampled_from([0.7, 1.5, 3.0]))
    seed = draw(st.integers(0, 2**20))
    temperature = draw(st.sampled_from([0.5, 1.0, 1.5]))
    top_k = draw(st.one_of(st.none(), st.integers(1, V)))
    top_p = draw(st.one_of(st.none(), st.sampled_from([0.5, 0.8, 0.95])))
    length = 4 if V <= 6 else 3
    target = MarkovChainLM.random(V, seed, order=order, sharpness=sharp_t, n_positions=16, batch_size=SAMPLES)
    draft = MarkovChainLM.random(V, seed + 1, order=order, sharpness=sharp_d, n_positions=16, batch_size=SAMPLES)
    return dict(target=target, draft=draft, temperature=temperature, top_k=top_k, top_p=top_p, length=length,
                seed=seed)


def assert_exact(report):
    assert report.passed, report.format()
    assert report.p_value >= 1e-6


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@SETTINGS
@given(case=cases())
def test_default_acceptor_is_exact_with_a_model_draft(k, case):
    assert_exact(check_exactness("default", case.pop("draft"), k, samples=SAMPLES, **case))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@SETTINGS
@given(case=cases(), deterministic=st.booleans())
def test_sample_match_acceptor_is_exact(k, case, deterministic):
    draft = "ngram" if deterministic else case["draft"]
    case.pop("draft")
    assert_exact(check_exactness("sample-match", draft, k, samples=SAMPLES, **case))


@pytest.mark.parametrize("draft,k", [("self:1", 3), ("self:1", 6), ("ngram", 4), ("ngram:2", 2)])
@settings(derandomize=True, max_examples=1, deadline=None, database=None)
@given(case=cases())
def test_default_acceptor_is_exact_with_self_and_ngram_drafts(draft, k, case):
    case.pop("draft")
    assert_exact(check_exactness("default", draft, k, samples=SAMPLES, **case))


def test_exact_with_eos_ragged_prompts_and_order_two_chains():
    # rows split over two prompts of different lengths; EOS (id 2) ends rows at different steps
    report = check_exactness("default", "model", 4, samples=SAMPLES, vocab=5, order=2, length=4, temperature=1.0,
                             prompts=[[0], [3, 1, 4]], eos_token_id=2, seed=11)
    assert_exact(report)
    assert len(report.groups) == 2


class CyclingK:
    """A k-policy that changes k every step (k = 1 steps leave the draft cache several slots behind)."""

    max_k = 6

    def __init__(self):
        self.i = 0

    def next_k(self):
        self.i += 1
        return [1, 4, 1, 1, 6, 2, 3][self.i % 7]

    def observe(self, k, accepted, draft_s, target_s):
        pass


def test_exact_when_k_changes_every_step():
    assert_exact(check_exactness("default", "model", CyclingK(), samples=SAMPLES, vocab=4, order=2, length=5, seed=3))


# ---- tier 4: the harness must fail for biased pairings -----------------------------------------


@pytest.mark.parametrize("k,temperature", [(2, 1.0), (4, 0.5)])
def test_argmax_draft_with_soft_q_fails_by_a_wide_margin(k, temperature):
    report = check_exactness("default", "argmax-softq", k, samples=SAMPLES, vocab=5, length=3, temperature=temperature)
    assert not report.passed
    assert report.p_value < 1e-30 and report.tv_distance > 0.01, report.format()


def test_reusing_the_accept_uniform_for_the_resample_fails_by_a_wide_margin():
    report = check_exactness("shared-uniform", "model", 3, samples=SAMPLES, vocab=5, length=3)
    assert not report.passed
    assert report.p_value < 1e-30 and report.tv_distance > 0.05, report.format()


@pytest.mark.parametrize("acceptor", ["typical", "greedy"])
def test_lossy_acceptors_fail(acceptor):
    report = check_exactness(acceptor, "model", 3, samples=SAMPLES, vocab=5, length=3)
    assert not report.passed and report.p_value < 1e-30, report.format()


class StaleSlotTarget(MarkovChainLM):
    """A loop bug in miniature: verify passes skip writing their first slot, so an order-2 chain
    reads a stale previous token there."""

    def forward(self, input_ids, positions, logits_at=None, **kw):
        if input_ids.shape[1] > 1 and logits_at is None:
            before = self.cache[: len(input_ids)].gather(1, positions.long()[:, None]).clone()
            out = super().forward(input_ids, positions, logits_at, **kw)
            self.cache[: len(input_ids)].scatter_(1, positions.long()[:, None], before)
            return out
        return super().forward(input_ids, positions, logits_at, **kw)

    def with_batch_size(self, batch_size):
        return StaleSlotTarget(self.layer_logits, order=self.order, n_positions=self.n_positions, batch_size=batch_size)


def test_a_stale_cache_slot_in_the_target_is_caught():
    good = MarkovChainLM.random(5, 4, order=2, sharpness=3.0, n_positions=16)
    bad = StaleSlotTarget(good.layer_logits, order=2, n_positions=16)
    report = check_exactness("default", "model", 3, samples=SAMPLES, length=4, target=bad, seed=4)
    assert not report.passed and report.p_value < 1e-30, report.format()
    assert_exact(check_exactness("default", "model", 3, samples=SAMPLES, length=4, target=good, seed=4))


def test_statistic_choice_and_report_fields():
    report = check_exactness("default", "model", 3, samples=20_000, vocab=4, length=3, statistic="g")
    assert report.statistic == "g" and report.value == report.groups[0]["g"]
    assert 0 <= report.tv_distance < 0.1 and report.dof >= 1
    assert "PASS" in report.format() and '"verdict"' in report.to_json()
    with pytest.raises(ValueError, match="statistic"):
        check_exactness(statistic="kl")
    spec = report.speculation
    assert sum(spec["accepted_histogram"]) == spec["row_passes"] and spec["rows"] == 20_000
