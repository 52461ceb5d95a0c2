"""k-policies: AdaptiveK picks the k that maximises expected tokens per second (checked against
the Leviathan formula evaluated here, independently), follows per-position acceptance, keeps
its cost table monotone, and leaves the output distribution exact (tier 3 through the checker)."""

import pytest
import torch

from verispec.spec import SpeculativeGenerator
from verispec.spec.checker import check_exactness
from verispec.spec.policy import AdaptiveK, FixedK, as_policy


def accepted_counts(alphas: list[float], rows: int) -> torch.Tensor:
    """[rows] accepted-draft counts whose conditional acceptance at draft i is alphas[i]."""
    g = len(alphas)
    reach = [rows]  # rows that accepted >= i drafts
    for a in alphas:
        reach.append(round(reach[-1] * a))
    counts = [reach[i] - reach[i + 1] for i in range(g)] + [reach[g]]
    return torch.repeat_interleave(torch.arange(g + 1), torch.tensor(counts))


def trained(alphas, draft_per_position: float, verify, steps: int = 30, rows: int = 20000) -> AdaptiveK:
    policy = AdaptiveK(max_k=len(alphas) + 1)
    policy.calibrate(verify, batch=1)
    k = policy.max_k
    for _ in range(steps):
        policy.observe(k, accepted_counts(alphas, rows), draft_s=draft_per_position * (k - 1), target_s=verify(k))
    return policy


def leviathan_rates(alpha: float, c: float, verify, max_k: int) -> dict:
    """Expected tokens per second for a constant acceptance alpha (docs/design.md's formula, unnormalised)."""
    return {k: (1 - alpha**k) / (1 - alpha) / (c * (k - 1) + verify(k)) for k in range(1, max_k + 1)}


@pytest.mark.parametrize("alpha,c,slope,", [(0.3, 0.05, 0.3), (0.3, 0.02, 0.1), (0.3, 0.05, 0.0), (0.6, 0.05, 0.05),
                                            (0.8, 0.1, 0.1), (0.8, 0.02, 0.02)])
def test_adaptive_k_matches_leviathan_argmax(alpha, c, slope):
    verify = lambda k: 1.0 + slope * (k - 1)  # noqa: E731  seconds of a k-token pass
    rates = leviathan_rates(alpha, c, verify, 8)
    ranked = sorted(rates, key=rates.get, reverse=True)
    assert rates[ranked[0]] > 1.01 * rates[ranked[1]], "case too close to a tie to be a test"
    policy = trained([alpha] * 7, c, verify)
    assert policy.next_k() == ranked[0]


def test_adaptive_k_uses_per_position_acceptance():
    """Draft 1 almost always accepted, later drafts almost never: k = 2 (one draft), although the
    pooled rate (about 0.5) would ask for more."""
    verify = lambda k: 1.0 + 0.02 * (k - 1)  # noqa: E731
    policy = trained([0.97, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05], 0.05, verify)
    pooled = leviathan_rates(0.51, 0.05, verify, 8)
    assert max(pooled, key=pooled.get) > 2
    assert policy.next_k() == 2
    assert policy.position_acceptance()[0] > 0.9 > 0.1 > policy.position_acceptance()[1]


def test_adaptive_k_follows_a_change_of_acceptance():
    verify = lambda k: 1.0 + 0.02 * (k - 1)  # noqa: E731
    policy = trained([0.95] * 7, 0.05, verify, rows=1000)
    assert policy.next_k() == 8
    for _ in range(100):  # the draft stops agreeing: decayed counts forget the good stretch
        policy.observe(2, accepted_counts([0.02], 1000), draft_s=0.05, target_s=verify(2))
    assert policy.next_k() == 1


def test_adaptive_k_starts_at_start_k_and_cost_table_is_monotone():
    policy = AdaptiveK(max_k=6, start_k=3)
    assert policy.next_k() == 3  # nothing measured yet
    noisy = {1: 1.0, 2: 1.3, 3: 1.1, 4: 1.4, 5: 1.2, 6: 1.6}
    policy.calibrate(noisy.__getitem__, batch=2, largest_k=5)
    table = policy._verify_table()
    assert [table[k] for k in range(1, 7)] == sorted(table[k] for k in range(1, 7))
    assert table[6] == table[5]  # k = 6 did not fit: the largest measured k stands in
    assert not policy.needs_calibration(2) and policy.needs_calibration(3)


def test_as_policy_and_bad_k():
    assert isinstance(as_policy(3), FixedK) and as_policy("auto").max_k == 8 and as_policy("auto:5").max_k == 5
    for bad, err in [("fast", TypeError), ("4", TypeError), ("auto:0", ValueError), ("auto:x", ValueError), (0, ValueError),
                     (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="k"):
            as_policy(bad)
    with pytest.raises(ValueError, match="prior_acceptance"):
        AdaptiveK(prior_acceptance=1.5)


class ScriptedCosts(AdaptiveK):
    """AdaptiveK with fixed costs instead of wall-clock ones, so its k depends only on the
    acceptance it observes (and the run is deterministic)."""

    def calibrate(self, time_verify, batch, largest_k=None):
        super().calibrate(lambda k: 1.0 + 0.05 * k, batch, largest_k)

    def observe(self, k, accepted, draft_s, target_s):
        super().observe(k, accepted, 0.05 * (k - 1), 1.0 + 0.05 * k)


def test_adaptive_k_is_exact():
    policy = ScriptedCosts(max_k=6, start_k=2)
    report = check_exactness("default", "model", policy, samples=100_000, vocab=4, order=2, length=5, seed=5)
    assert report.passed, report.format()
    assert len(report.speculation["k_counts"]) >= 2, report.speculation["k_counts"]  # k really changed


def test_auto_in_the_generator_reports_calibration(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    target = LlamaForSampling.from_pretrained(path, n_positions=64)
    draft = LlamaForSampling.from_pretrained(path, n_positions=64)
    res = SpeculativeGenerator(draft, target, "auto:5").generate(torch.tensor([[1, 2, 3]]), 30, temperature=0)
    stats = res.stats.to_dict()
    assert stats["policy"] == "AdaptiveK(max_k=5)" and stats["calibration_s"] > 0
    assert set(stats["k_counts"]) <= set(range(1, 6)) and sum(stats["k_counts"].values()) == stats["steps"]
    assert torch.equal(res.tokens, target.sample(torch.tensor([[1, 2, 3]]), 30, temperature=0))


@pytest.mark.parametrize("explore_from_1, explored", [(8, 3), (2, 9)])
def test_adaptive_k_explores_one_k_further_now_and_then(explore_from_1, explored):
    """Drafts never accepted: k = 1 is best, but every explore_from_1 + 1 steps one step uses k = 2,
    so acceptance keeps being measured (and a draft that improves would be noticed)."""
    verify = lambda k: 1.0 + 0.1 * (k - 1)  # noqa: E731
    policy = trained([0.0] * 7, 0.3, verify, rows=1)
    policy.explore_from_1 = explore_from_1
    chosen = []
    for _ in range(27):
        k = policy.next_k()
        chosen.append(k)
        policy.observe(k, torch.zeros(1, dtype=torch.long), draft_s=0.3 * (k - 1), target_s=verify(k))
    assert set(chosen) == {1, 2} and chosen.count(2) == explored, chosen
    assert AdaptiveK().explore_from_1 == 2 and AdaptiveK().explore_every == 8


def test_a_pass_that_catches_the_draft_up_is_not_a_draft_cost():
    """After k = 1 passes the next pass's first draft forward feeds every skipped token; its time
    does not enter the per-position draft cost (it once kept the policy at k = 1). The pass after
    it, an ordinary one, does."""
    verify = lambda k: 1.0 + 0.1 * (k - 1)  # noqa: E731
    policy = trained([0.5] * 7, 0.3, verify, rows=1)
    assert policy.draft_s_per_position == pytest.approx(0.3)
    policy.observe(1, torch.zeros(1, dtype=torch.long), draft_s=0.0, target_s=1.0)
    policy.observe(2, torch.zeros(1, dtype=torch.long), draft_s=3.0, target_s=1.1)  # catch-up: ignored
    assert policy.draft_s_per_position == pytest.approx(0.3)
    policy.observe(2, torch.zeros(1, dtype=torch.long), draft_s=0.5, target_s=1.1)
    assert policy.draft_s_per_position == pytest.approx(0.8 * 0.3 + 0.2 * 0.5)


@pytest.mark.parametrize("carry, cap", [(0.0, 4.0), (1.0, float("inf")), (1.0, 4.0), (0.5, 100.0)])
def test_a_new_sequence_keeps_only_carry_of_the_acceptance_evidence(carry, cap):
    """After a long stretch where every draft was accepted (k = 8), a new prompt whose drafts are
    seldom accepted. Starting afresh (carry = 0) the policy is at k <= 3 from its first pass and at
    k = 2 after a few; carrying all the evidence over (no cap) it is still proposing 7 drafts ten
    passes later; with the default cap of 4 row-passes it leaves k = 8 after a few passes and is at
    k <= 4 by the tenth (the deep positions it never reaches keep their carried rates, so it comes
    down one k at a time). Costs survive the reset."""
    verify = lambda k: 1.0 + 0.1 * (k - 1)  # noqa: E731
    policy = trained([0.95] * 7, 0.1, verify, rows=1)
    policy.carry, policy.carry_cap = carry, cap
    assert policy.next_k() == 8
    table, draft_cost, reached, kept = policy._verify_table(), policy.draft_s_per_position, policy.reached, policy.kept
    scale = carry * min(1.0, cap / (max(reached) * carry)) if carry else 0.0
    policy.begin_sequence()
    assert policy.reached == pytest.approx([r * scale for r in reached])
    assert policy.kept == pytest.approx([k * scale for k in kept])
    assert max(policy.reached) <= cap + 1e-9
    assert policy._verify_table() == table and policy.draft_s_per_position == draft_cost
    ks = []
    for a in [0, 1, 0, 0, 2, 0, 0, 1, 0, 0]:  # accepted drafts per pass: about 0.3 per position
        k = policy.next_k()
        ks.append(k)
        policy.observe(k, torch.tensor([min(a, k - 1)]), draft_s=0.1 * (k - 1), target_s=verify(k))
    if cap == float("inf"):
        assert ks == [8] * 10, ks
    elif carry == 0.0:
        assert max(ks[4:]) <= 3 and policy.next_k() == 2, ks
    elif cap == 4.0:
        assert ks[:6].count(8) < 6 and ks[-1] <= 4 and ks == sorted(ks, reverse=True), ks
    else:  # half of a long stretch, capped at 100 passes: still deep
        assert min(ks) >= 6, ks


@pytest.mark.parametrize("kwargs, message", [({"carry": 1.5}, "carry"), ({"carry_cap": -1}, "carry_cap"),
                                             ({"carry_cap": float("nan")}, "carry_cap"),
                                             ({"explore_from_1": 0}, "explore_from_1")])
def test_adaptive_k_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveK(**kwargs)
    assert AdaptiveK().carry == 1.0 and AdaptiveK().carry_cap == 4.0


def test_the_generator_starts_each_call_with_begin_sequence(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    target = LlamaForSampling.from_pretrained(path, n_positions=64)
    draft = LlamaForSampling.from_pretrained(path, n_positions=64)
    calls = []

    class Counting(FixedK):
        def begin_sequence(self):
            calls.append(True)

    gen = SpeculativeGenerator(draft, target, Counting(3))
    for _ in range(2):
        gen.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)
    assert len(calls) == 2


def gate_policy(alpha_2: float) -> AdaptiveK:
    """max_k = 3, a draft step costing 1 s, every verify pass 10 s, no overhead; a draft in the
    upper half of confidence is always accepted, one in the lower half never (2 bins, no
    shrinkage); by position, draft 1 is accepted 90% of the time and draft 2 ``alpha_2``."""
    policy = AdaptiveK(max_k=3, shrink=0.0, conf_bins=2, conf_shrink=0.0)
    policy.set_gated(True)
    policy.calibrate(lambda k: 10.0, batch=1)
    policy.draft_s_per_position, policy.overhead_s = 1.0, 0.0
    policy.reached, policy.kept = [100.0, 100.0], [90.0, 100.0 * alpha_2]
    policy.conf_reached[:] = torch.tensor([1000.0, 1000.0])
    policy.conf_kept[:] = torch.tensor([0.0, 1000.0])
    return policy


@pytest.mark.parametrize("alpha_2, confs, keep", [
    (0.5, [0.9], True),  # 2 tokens in 11 s now; 2.5 in 12 s with draft 2
    (0.5, [0.1], False),  # draft 1 will be rejected: 1 token either way, the 12 s pass is slower
    (0.05, [0.9], False),  # 2.05 tokens in 12 s is worse than 2 in 11 s
    (0.2, [0.9], True),  # 2.2 / 12 > 2 / 11
    (0.2, [0.9, 0.1], False),  # rows add up: 3 tokens in 11 s against 3.2 in 12 s
    (0.3, [0.9, 0.1], True),  # 3.3 / 12 > 3 / 11
])
def test_the_drafting_gate_drafts_on_only_when_it_pays(alpha_2, confs, keep):
    policy = gate_policy(alpha_2)
    assert policy.next_k() == 3  # best k by position (2) > 1: the gate decides, up to max_k
    assert policy.keep_drafting(torch.tensor(confs)) is keep


def test_the_drafting_gate_is_off_without_confidences_or_when_disabled():
    policy = gate_policy(0.05)
    policy.set_gated(False)  # e.g. an n-gram draft, which reports no confidences
    assert policy.next_k() == 2  # the formula's k, as before
    assert policy.keep_drafting(torch.tensor([0.1])) is True  # not a gated pass: draft on to k
    policy = gate_policy(0.05)
    policy.gate = False
    assert policy.next_k() == 2


def test_the_gate_learns_acceptance_by_confidence():
    """Drafts with confidence 0.9, 0.8, 0.1; one accepted: drafts 1 and 2 were judged (bins 7 and
    6 of 8), draft 1 accepted; draft 3 came after a rejection and teaches nothing."""
    policy = AdaptiveK(max_k=4)
    policy.set_gated(True)
    policy.calibrate(lambda k: 1.0 + 0.1 * k, batch=1)
    policy.observe(2, torch.tensor([1]), draft_s=0.1, target_s=1.2)  # costs known: the next pass is gated
    before = policy.conf_reached.clone()
    assert policy.next_k() == 4
    for c in (0.9, 0.8, 0.1):
        policy.keep_drafting(torch.tensor([c]))
    policy.observe(4, torch.tensor([1]), draft_s=0.3, target_s=1.4)
    reached = before * policy.decay
    reached[7] += 1
    reached[6] += 1
    assert torch.allclose(policy.conf_reached, reached)
    assert policy.conf_kept.tolist() == [0.0] * 7 + [1.0]
    with pytest.raises(ValueError, match="conf_bins"):
        AdaptiveK(conf_bins=0)


class RecordingGate(ScriptedCosts):
    def keep_drafting(self, conf):
        verdict = super().keep_drafting(conf)
        self.verdicts.append((self._pass is not None, verdict))
        return verdict


def test_gated_adaptive_k_is_exact():
    """The gate ends passes before max_k from row-summed confidences; tier 3 on toy chains."""
    policy = RecordingGate(max_k=6, start_k=2, conf_bins=4)
    policy.verdicts = []
    report = check_exactness("default", "model", policy, samples=100_000, vocab=4, order=2, length=8, seed=6,
                             temperature=0.8)
    assert report.passed, report.format()
    assert (True, False) in policy.verdicts and (True, True) in policy.verdicts  # gated passes, stopped early
    assert policy.conf_reached.sum() > 0  # the gate heard the draft


def test_a_stalled_pass_does_not_flatten_the_verify_table():
    """k = 6 calibrated at 97 ms, then three passes at 97 ms and one stalled at 300 ms; k = 8 runs
    often at 116 ms. The table keeps k = 6 < 7 < 8 (medians); an exponential average (0.2) would
    put k = 6 at about 134 ms and pool 6, 7 and 8 into one price."""
    cost = {1: 0.090, 2: 0.090, 3: 0.090, 4: 0.090, 5: 0.090, 6: 0.097, 7: 0.105, 8: 0.116}
    policy = AdaptiveK(max_k=8)
    policy.calibrate(cost.__getitem__, batch=1)
    for seconds in (0.097, 0.300, 0.097, 0.097):
        policy.observe(6, torch.tensor([5]), draft_s=0.075, target_s=seconds)
    for _ in range(40):
        policy.observe(8, torch.tensor([7]), draft_s=0.105, target_s=0.116)
    table = policy._verify_table()
    assert (table[6], table[7], table[8]) == pytest.approx((0.097, 0.105, 0.116))
    with pytest.raises(ValueError, match="verify_window"):
        AdaptiveK(verify_window=0)


def test_seldom_used_k_is_priced_at_the_live_level():
    """Calibrated at 80 + 5k ms; in the loop every pass runs 25% slower (the machine slowed, or
    the draft's working set evicted the target's). Only k = 8 and k = 3 ever run: the other entries
    follow the live level (calibration x 1.25), not the calibration alone, and k = 3 is priced at
    its own live cost (0.994 of calibration x level; its passes next to k = 8 passes say so)."""
    cost = {k: 0.080 + 0.005 * k for k in range(1, 9)}
    policy = AdaptiveK(max_k=8, verify_prior=2.0)
    policy.calibrate(cost.__getitem__, batch=1)
    assert policy._verify_table() == pytest.approx(cost)  # before any live pass: the calibration
    for _ in range(40):
        policy.observe(8, torch.tensor([7]), draft_s=0.105, target_s=1.25 * cost[8])
    for _ in range(6):
        policy.observe(3, torch.tensor([2]), draft_s=0.030, target_s=0.118)
    table = policy._verify_table()
    assert policy.verify_level() == pytest.approx(1.25, rel=0.005)
    for k in (1, 2, 4, 5, 6, 7, 8):
        assert table[k] == pytest.approx(1.25 * cost[k], rel=0.005)
    assert table[3] == pytest.approx(0.118, rel=0.003) and table[3] < 1.25 * cost[3] * 0.997
    assert policy.state()["verify_level"] == pytest.approx(1.25, rel=0.005)
    with pytest.raises(ValueError, match="verify_prior"):
        AdaptiveK(verify_prior=0)


# A k=auto run as measured (bench/results/e2e_step_p8_nohf.json, code greedy): one prompt decoded in
# a slow spell, and k=auto ran most of its k = 6 passes there (12 of 18 passes in the spell).
_PASS_COST = {1: 0.082, 2: 0.092, 3: 0.095, 4: 0.096, 5: 0.096, 6: 0.097, 7: 0.108, 8: 0.117}
_SPELL = [([8, 8, 6, 8, 5, 8] * 5, 1.0), ([6, 6, 6, 7, 6, 6, 8, 6, 2, 6, 6, 7, 6, 6, 5, 6, 6, 7], 1.3),
          ([8, 8, 8, 5, 8, 8] * 10, 1.0)]


@pytest.mark.parametrize("level_window, priced_right", [(16, True), (0, False)])
def test_a_k_run_in_a_slow_spell_is_priced_at_the_speed_of_now(level_window, priced_right):
    """After the spell the machine is back at its calibrated speed. Each pass of k is compared with
    the passes of other k's around it, so k = 6 stays at its true 97 ms, below k = 7 and 8; a
    table of each k's own recent passes (``verify_level_window=0``, as before) keeps the spell's
    1.3x for k = 6 and the monotone fit pools it with 7 and 8, as the measured run did."""
    policy = AdaptiveK(max_k=8, verify_level_window=level_window)
    policy.calibrate(_PASS_COST.__getitem__, batch=1)
    for ks, speed in _SPELL:
        for k in ks:
            policy.observe(k, torch.tensor([k - 1]), draft_s=0.015 * (k - 1), target_s=speed * _PASS_COST[k])
    table = policy._verify_table()
    right = table[6] == pytest.approx(0.097, rel=0.02) and table[6] < table[7] < table[8]
    assert right == priced_right, table
    if priced_right:
        assert table == pytest.approx(_PASS_COST, rel=0.02) and policy.verify_level() == pytest.approx(1.0)
        assert policy.state()["verify_shape"][6] == pytest.approx(1.0, abs=0.02)


def test_neighbours_reveal_a_miscalibrated_k():
    """Calibration put k = 5 at 80 ms where every live pass of it costs 100 (its neighbours in the
    loop cost what calibration said): the shape factor of k = 5 learns 1.25, through a slow
    drift of the machine's speed, and the others stay at 1 (the median k's shape is 1: live
    passes only say how k's compare)."""
    cost = {k: 0.080 + 0.005 * k for k in range(1, 9)}
    live = {**cost, 5: 1.25 * cost[5]}
    policy = AdaptiveK(max_k=8)
    policy.calibrate(cost.__getitem__, batch=1)
    for i in range(120):
        k = (5, 8, 6, 8)[i % 4]
        speed = 1.0 + 0.3 * i / 120  # 1.0 -> 1.3
        policy.observe(k, torch.tensor([k - 1]), draft_s=0.015 * (k - 1), target_s=speed * live[k])
    shape = policy.state()["verify_shape"]
    assert shape[5] == pytest.approx(1.25, rel=0.03)
    assert shape[6] == pytest.approx(1.0, abs=0.02) and shape[8] == pytest.approx(1.0, abs=0.02)
    assert policy.verify_level() == pytest.approx(1.0 + 0.3 * 111.5 / 120, rel=0.01)  # median speed, last 16 passes
    with pytest.raises(ValueError, match="verify_level_window"):
        AdaptiveK(verify_level_window=-1)


def test_calibration_rounds_alternate_and_keep_the_fastest():
    calls = []
    spikes = {(2, 0): 0.5, (3, 1): 0.7, (4, 2): 0.9}  # (k, round) -> a stalled forward

    def time_verify(k):
        r = sum(c == k for c in calls)
        calls.append(k)
        return spikes.get((k, r), 0.1 * k)

    policy = AdaptiveK(max_k=4, calibration_rounds=3)
    policy.calibrate(time_verify, batch=1)
    assert calls == [1, 2, 3, 4, 4, 3, 2, 1, 1, 2, 3, 4]
    assert policy.state()["verify_calibrated"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    with pytest.raises(ValueError, match="calibration_rounds"):
        AdaptiveK(calibration_rounds=0)



def test_a_dear_draft_estimate_is_corrected_by_passes_after_k1():
    """A draft cost learned during a slow spell made k=auto choose k = 1, and the k = 2 passes it
    explores always follow a k = 1 pass (their first draft forward feeds the skipped token too),
    whose cost was never learned: the estimate stayed dear for good (measured: 65 of 97 passes at
    k = 1 in a run). A pass after k = 1 may now lower the estimate, never raise it."""
    import torch

    from verispec.spec.policy import AdaptiveK

    p = AdaptiveK(max_k=4)
    p.observe(3, torch.tensor([2]), draft_s=2.0, target_s=0.01)  # 1 s per drafted position: a slow spell
    assert p.draft_s_per_position == 1.0
    for _ in range(40):
        p.observe(1, torch.tensor([0]), draft_s=0.0, target_s=0.01)  # a k = 1 pass
        p.observe(2, torch.tensor([1]), draft_s=0.02, target_s=0.01)  # a k = 2 pass after it: cheap
    assert p.draft_s_per_position < 0.05
    p.observe(1, torch.tensor([0]), draft_s=0.0, target_s=0.01)
    p.observe(2, torch.tensor([1]), draft_s=5.0, target_s=0.01)  # a dear catch-up pass does not raise it
    assert p.draft_s_per_position < 0.05
