"""Tier 1: golden cases for the acceptors, every expected value worked out by hand from the
rule in the papers (accept x with probability min(1, p(x)/q(x)) as u * q(x) < p(x); recovered
token from normalize(max(0, p - q)); bonus token from the last p; the token picked by the
exponential race argmax_v r_v / E_v)."""

import pytest
import torch

from spec_helpers import FixedRandomness, probs
from verispec.spec import (
    DefaultTokenAcceptor,
    GreedyTokenAcceptor,
    SampleMatchAcceptor,
    TypicalAcceptor,
    rejection_sample,
)

P = [0.5, 0.3, 0.2]
Q = [0.6, 0.25, 0.15]


def run(draft, q_rows, p_rows, u, e):
    """One batch row through rejection_sample: returns (accepted, tokens list)."""
    a, t = rejection_sample(torch.tensor([draft]), probs(*q_rows) if q_rows else torch.zeros(1, 0, len(p_rows[0])),
                            probs(*p_rows), torch.tensor([u], dtype=torch.float32),
                            torch.tensor([e], dtype=torch.float32))
    return int(a[0]), t[0].tolist()


def test_paper_example_accept_below_ratio():
    # p(0)/q(0) = .5/.6 = .8333: u = .8 -> .8 * .6 = .48 < .5, accepted; bonus from p_2 = one-hot on 2
    assert run([0], [Q], [P, [0, 0, 1]], [0.8], [1, 1, 1]) == (1, [0, 2])


def test_paper_example_reject_above_ratio_and_residual():
    # u = .9 -> .54 >= .5, rejected; residual max(0, p - q) = [0, .05, .05]
    # E = [1, 1, 2]: r/E = [0, .05, .025] -> 1;  E = [1, 2, 1]: [0, .025, .05] -> 2
    assert run([0], [Q], [P, [1, 0, 0]], [0.9], [1, 1, 2]) == (0, [1, -1])
    assert run([0], [Q], [P, [1, 0, 0]], [0.9], [1, 2, 1]) == (0, [2, -1])


def test_paper_example_residual_never_emits_token_with_p_below_q():
    # token 0 has p < q, so it has no residual mass: even a tiny E_0 cannot pick it
    assert run([0], [Q], [P, [1, 0, 0]], [0.99], [1e-6, 1, 1])[1][0] in (1, 2)


def test_argmax_draft_with_soft_q_emits_five_sixths_of_token_zero():
    """Pitfall 1: x = argmax q = 0 every time, reported q = [.6, .25, .15]. Accept iff u < 5/6,
    so over the 1200 midpoint uniforms (i + .5)/1200 exactly 1000 accept: 5/6 = .83, not p(0) = .5."""
    n = 1200
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    a, t = rejection_sample(torch.zeros(n, 1, dtype=torch.long), probs(Q).expand(n, 1, 3), probs(P, P).expand(n, 2, 3),
                            u[:, None], torch.ones(n, 3))
    assert int(a.sum()) == 1000
    assert (t[:, 0] == 0).sum() == 1000


def test_boundary_uniform_is_a_rejection():
    # u * q == p exactly (.5 * .5 = .25, all exact in fp32): the test is strict, so rejected
    assert run([1], [[0.5, 0.5]], [[0.75, 0.25], [0, 1]], [0.5], [1, 1])[0] == 0
    # the largest fp32 below .5 accepts
    below = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))
    assert run([1], [[0.5, 0.5]], [[0.75, 0.25], [0, 1]], [below], [1, 1])[0] == 1


def test_zero_uniform_accepts_iff_target_has_mass():
    assert run([1], [[0.5, 0.5]], [[1, 0], [0, 1]], [0.0], [1, 1]) == (0, [0, -1])  # p(1) = 0: rejected
    assert run([1], [[0.5, 0.5]], [[0.9, 0.1], [0, 1]], [0.0], [1, 1]) == (1, [1, 1])


def test_draft_with_zero_q_is_defined():
    # q(x) = 0 for the drafted x = 2: accepted iff p(x) > 0, never NaN
    assert run([2], [[0.5, 0.5, 0]], [[0.2, 0.2, 0.6], [1, 0, 0]], [0.999], [1, 1, 1]) == (1, [2, 0])
    # q(x) = 0 and p(x) = 0: rejected; residual max(0, p - q) = [0, .5, 0] -> 1
    assert run([2], [[0.5, 0.5, 0]], [[0, 1, 0], [1, 0, 0]], [0.3], [1, 1, 1]) == (0, [1, -1])


def test_p_equal_q_always_accepts():
    # u * q < p = q for every u < 1
    assert run([2], [[0.25, 0.25, 0.5]], [[0.25, 0.25, 0.5], [0, 1, 0]], [0.99999994], [1, 1, 1]) == (1, [2, 1])


def test_empty_residual_falls_back_to_target():
    # p <= q everywhere (q unnormalised by rounding): u = .9 rejects x = 0 (.54 >= .5) and
    # max(0, p - q) = 0; the token comes from p = [.5, .5]: E = [2, 1] -> .25 vs .5 -> 1
    assert run([0], [[0.6, 0.5]], [[0.5, 0.5], [1, 0]], [0.9], [2, 1]) == (0, [1, -1])


def test_one_hot_target():
    # p one-hot on 1: x = 2 is rejected for any u; residual [0, .7, 0] -> 1 whatever E
    assert run([2], [[0.3, 0.3, 0.4]], [[0, 1, 0], [0, 0, 1]], [0.0], [1e-3, 5, 1e-3]) == (0, [1, -1])
    # x = 1 is accepted for any u < 1 (u * .3 < 1)
    assert run([1], [[0.3, 0.3, 0.4]], [[0, 1, 0], [0, 0, 1]], [0.99], [1, 1, 1]) == (1, [1, 2])


def test_three_drafts_accept_accept_reject():
    # drafts 1, 0, 2 with q = uniform thirds; p rows give ratios 1.5 (accept), .6 (u=.5 accepts),
    # 0 (reject); residual at slot 3 = max(0, [.5, .5, 0] - 1/3) = [1/6, 1/6, 0]; E = [1, .5, 1] -> 1
    third = [1 / 3] * 3
    a, t = run([1, 0, 2], [third] * 3, [[0.25, 0.5, 0.25], [0.2, 0.4, 0.4], [0.5, 0.5, 0], [1, 0, 0]],
               [0.1, 0.5, 0.0], [1, 0.5, 1])
    assert (a, t) == (2, [1, 0, 1, -1])


def test_all_accepted_emits_bonus_from_last_position():
    a, t = run([0, 0], [[1, 0], [1, 0]], [[1, 0], [1, 0], [0.5, 0.5]], [0.5, 0.5], [4, 1])
    assert (a, t) == (2, [0, 0, 1])  # bonus: .5/4 < .5/1 -> 1


def test_rows_are_independent_and_token_zero_is_a_token():
    # row 0 accepts both drafts (genuine id 0), row 1 rejects its first: pitfall 5
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    p = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    a, t = rejection_sample(torch.zeros(2, 2, dtype=torch.long), q, p, torch.full((2, 2), 0.5), torch.ones(2, 2))
    assert a.tolist() == [2, 0]
    assert t.tolist() == [[0, 0, 1], [1, -1, -1]]


def test_no_drafts_samples_from_p():
    # g = 0: one token from p_0 by the race: [.5, .3, .2] / [2, .5, 1] = [.25, .6, .2] -> 1
    assert run([], [], [P], [], [2, 0.5, 1]) == (0, [1])


def test_race_ties_take_the_lowest_id():
    assert run([], [], [[0.25, 0.25, 0.5]], [], [1, 1, 2]) == (0, [0])


def test_default_acceptor_draws_accept_and_race_from_separate_streams():
    rng = FixedRandomness(uniforms=[[0.9]], exponentials=[[1, 1, 2]])
    a, t = DefaultTokenAcceptor()(torch.tensor([[0]]), probs(Q), probs(P, [1, 0, 0]), rng)
    assert (int(a[0]), t[0].tolist()) == (0, [1, -1])
    assert rng.calls == [("uniforms", (1, 1)), ("exponentials", (1, 3))]


def test_default_acceptor_uses_a_backend_kernel_once_chosen():
    calls = []

    def accept_reject(*args):
        calls.append(len(args))
        return rejection_sample(*args)

    class Kernels:
        name = "custom"

        def get(self, name):
            return accept_reject if name == "accept_reject" else None

    class Target:
        kernels = Kernels()

    acc = DefaultTokenAcceptor.for_target(Target())
    acc(torch.tensor([[0]]), probs(Q), probs(P, P), FixedRandomness([[0.1]], [[1, 1, 1]]))
    assert calls == [5]


def test_greedy_acceptor():
    # argmax per position: 2, 1, 1, 0; drafts 2, 1, 0 -> keep 2 drafts, emit argmax 1
    p = probs([0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05])
    a, t = GreedyTokenAcceptor()(torch.tensor([[2, 1, 0]]), torch.zeros(1, 3, 3), p, None)
    assert (int(a[0]), t[0].tolist()) == (2, [2, 1, 1, -1])


def test_sample_match_acceptor():
    # target samples by race: row 0 p=[.5,.5,0], E=[1,2,1] -> 0; row 1 p=[0,.5,.5], E=[1,1,2] -> 1;
    # row 2 p=[1,0,0] -> 0. Drafts 0, 2: first matches, second does not -> emit the sample 1
    p = probs([0.5, 0.5, 0], [0, 0.5, 0.5], [1, 0, 0])
    e = [[[1, 2, 1], [1, 1, 2], [1, 1, 1]]]
    rng = FixedRandomness(exponentials=e)
    a, t = SampleMatchAcceptor()(torch.tensor([[0, 2]]), torch.zeros(1, 2, 3), p, rng)
    assert (int(a[0]), t[0].tolist()) == (1, [0, 1, -1])
    assert rng.calls == [("exponentials", (1, 3, 3))]


def test_typical_acceptor_threshold():
    # p = [.5, .3, .2]: H = 1.0297 nats, .3 * exp(-H) = .1071 -> threshold min(.09, .1071) = .09;
    # draft 2 has p = .2 > .09: accepted. p = [.96, .02, .02]: H = .1957, .3 * exp(-H) = .2467 ->
    # threshold .09; draft 1 has p = .02: rejected; the token is sampled from that p: E picks 0
    acc = TypicalAcceptor()
    assert acc.lossless is False
    p = probs(P, [0.96, 0.02, 0.02], [0, 1, 0])
    a, t = acc(torch.tensor([[2, 1]]), torch.zeros(1, 2, 3), p, FixedRandomness(exponentials=[[1, 1, 1]]))
    assert (int(a[0]), t[0].tolist()) == (1, [2, 0, -1])


def test_lossless_labels():
    assert DefaultTokenAcceptor.lossless and SampleMatchAcceptor.lossless
    assert not GreedyTokenAcceptor.lossless and not TypicalAcceptor.lossless


@pytest.mark.parametrize("bad", [dict(posterior_threshold=0), dict(posterior_alpha=1.5)])
def test_typical_acceptor_rejects_bad_parameters(bad):
    with pytest.raises(ValueError, match="posterior"):
        TypicalAcceptor(**bad)
