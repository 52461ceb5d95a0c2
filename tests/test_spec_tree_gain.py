"""PairedTreeGain: the tree acceptor's expected path length and the first-child chain's expected
drafts kept (token-wise and block), from the same drafted trees."""

import itertools

import pytest
import torch

from verispec.spec import SpeculativeGenerator
from verispec.spec.resolve import make_tree_acceptor
from verispec.spec.tree_gain import PairedTreeGain, first_child_path
from verispec.testing import MarkovChainLM

ROWS = 3000


def test_first_child_path():
    assert first_child_path((-1, -1, 0, 0, 1, 2)) == [0, 2, 5]
    assert first_child_path((-1,)) == [0]
    assert first_child_path((-1, -1, -1)) == [0]
    assert first_child_path((-1, 0, 1, 2)) == [0, 1, 2, 3]


def _pair():
    target = MarkovChainLM.random(4, 51, sharpness=1.2, n_positions=16, batch_size=ROWS)
    draft = MarkovChainLM.random(4, 52, sharpness=1.2, n_positions=16, batch_size=ROWS)
    return target, draft


def _exact_chain_kept(target, draft, context: int, depth: int):
    """E[drafts kept] of a depth-``depth`` chain from ``context`` (order-1 chains, T = 1), by
    enumeration: token-wise sum_x q(x) prod_j min(1, p/q), block sum_x q(x) w_i."""
    p, q = target.table().softmax(-1).double(), draft.table().softmax(-1).double()  # [V, V]: row = context
    V = p.shape[0]
    token, block = 0.0, 0.0
    for i in range(1, depth + 1):
        for xs in itertools.product(range(V), repeat=i):
            ctx, q_seq, t, w = context, 1.0, 1.0, 1.0
            for x in xs:
                q_seq *= float(q[ctx, x])
                t *= min(1.0, float(p[ctx, x] / q[ctx, x]))
                w = min(1.0, w * float(p[ctx, x] / q[ctx, x]))
                ctx = x
            token += q_seq * t
            block += q_seq * w
    return token, block


@pytest.mark.parametrize("children", ["sample", "distinct"])
def test_first_child_chain_estimates_average_to_the_chain_rules_expectations(children):
    """Every row's first tree pass drafts the full [2,2] tree after the prefill's token c ~ p(. | 0)
    (three more tokens of room keep later passes shallower), so over those passes the first-child
    chain's sums average to the exact expected drafts kept of a k = 3 chain from c, averaged over c:
    token-wise and block."""
    target, draft = _pair()
    probe = PairedTreeGain(make_tree_acceptor("multistep"), children, samples=4)
    gen = SpeculativeGenerator(draft, target, acceptor=probe, tree=[2, 2], children=children, measure_decode_step=False)
    gen.generate(torch.zeros(ROWS, 1, dtype=torch.long), 1 + 4, seed=3)
    first = [r for r in probe.rows if r["chain_depth"] == 2]
    assert len(first) == ROWS  # one full-depth pass per row, the first
    after = target.table().softmax(-1).double()[0]  # the prefill's token c ~ p(. | 0)
    exact = [_exact_chain_kept(target, draft, c, 2) for c in range(4)]
    token = sum(float(after[c]) * exact[c][0] for c in range(4))
    block = sum(float(after[c]) * exact[c][1] for c in range(4))
    for key, exact in (("chain_t", token), ("chain_w", block)):
        xs = torch.tensor([r[key] for r in first], dtype=torch.float64)
        se = float(xs.std()) / len(xs) ** 0.5
        assert abs(float(xs.mean()) - exact) < 4 * se + 1e-9, (key, float(xs.mean()), exact, se)
    assert block > token + 0.01  # these chains gain from block verification, so the two keys differ
    assert all(r["chain_w"] >= r["chain_t"] - 1e-12 for r in probe.rows)


@pytest.mark.parametrize("acceptor,children", [("multistep", "sample"), ("traversal", "distinct"),
                                               ("recursive", "distinct"), ("multistep", "top")])
def test_wrapped_tree_acceptor_decides_as_the_plain_one_and_its_expectation_tracks_the_realised(acceptor, children):
    target, draft = _pair()
    prompts = torch.zeros(ROWS, 1, dtype=torch.long)
    kw = dict(tree=[2, 2, 1], children=children, measure_decode_step=False)
    plain = SpeculativeGenerator(draft, target, acceptor=acceptor, **kw).generate(prompts, 1 + 8, seed=7)
    probe = PairedTreeGain(make_tree_acceptor(acceptor), children, samples=8)
    gen = SpeculativeGenerator(draft, target, acceptor=probe, **kw)
    assert probe.name == plain.stats.acceptor and probe.lossless is True
    wrapped = gen.generate(prompts, 1 + 8, seed=7)
    assert torch.equal(plain.tokens, wrapped.tokens)  # the private uniforms leave the generator's stream alone
    s = probe.summary()
    assert s["row_passes"] == wrapped.stats.tree_passes == len(probe.rows)
    assert sum(r["realised"] for r in probe.rows) == wrapped.stats.accepted_drafts  # (k = 1 passes keep none)
    realised = torch.tensor([r["realised"] for r in probe.rows], dtype=torch.float64)
    expected = torch.tensor([r["expected"] for r in probe.rows], dtype=torch.float64)
    se = float((realised - expected).std()) / len(realised) ** 0.5
    assert abs(float(realised.mean() - expected.mean())) < 4 * se
    assert float(expected.var()) < float(realised.var())  # averaging the acceptor's own noise away
    if children == "top":  # the first child is the argmax, no chain draft
        assert "gain_over_token_wise_chain" not in s and all(r["chain_t"] is None for r in probe.rows)
    else:
        assert s["gain_over_block_chain"] <= s["gain_over_token_wise_chain"]
        assert s["gain_over_token_wise_chain"] > 1.0  # a [2,2,1] tree keeps more than its first-child chain
        assert 0 < s["gain_over_token_wise_chain_se"] < 0.05


def test_expected_count_is_exact_where_the_acceptor_is_deterministic():
    """p = q at every node: the acceptor keeps the whole first-child path whatever its uniforms."""
    from verispec.spec.tree import TreeSpec

    tree = TreeSpec((-1, -1, 0))
    V = 5
    law = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), 0)
    node_q = law.expand(2, 3, V).clone()
    target = law.expand(2, 4, V).clone()
    ids = torch.tensor([[1, 2, 3], [0, 4, 4]])
    probe = PairedTreeGain(make_tree_acceptor("multistep"), "sample", samples=5)

    class Stream:
        def uniforms(self, *shape):
            return torch.rand(shape)

        def exponentials(self, *shape):
            return torch.ones(shape)

    probe(tree, ids, node_q, target, Stream())
    assert [r["expected"] for r in probe.rows] == [2.0, 2.0] and [r["realised"] for r in probe.rows] == [2, 2]
    assert [r["chain_t"] for r in probe.rows] == [pytest.approx(2.0)] * 2


def test_samples_must_be_positive():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        PairedTreeGain(make_tree_acceptor("multistep"), "sample", samples=0)
