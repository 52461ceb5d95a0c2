"""Tree acceptors "recursive" (Jeon et al.'s recursive rejection sampling without replacement) and
"traversal" (Weng et al.'s traversal verification), spec/tree_acceptors.py: exactness by the chi-square
tier per children mode and temperature, power against broken variants, recursive = multistep on
honest laws, traversal = block verification on chains (same decisions, and the exact accepted-length
law by enumeration), traversal keeps at least as many tokens as multistep on chains (enumeration),
temperature 0, and the output contract."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import EXACTNESS_SAMPLES, FixedRandomness
from test_spec_tree import awkward_inputs  # random p and q with exact zeros, one-hot rows, p = q rows

from verispec.cli import main
from verispec.spec import tree_acceptors as ta
from verispec.spec.block import block_terms, block_verify
from verispec.spec.checker import check_tree_exactness, sample_tree
from verispec.spec.goodness_of_fit import goodness_of_fit
from verispec.spec.tree import TREE_ACCEPTORS, TreeSpec, accept_tree_by_ids, multistep_accept
from verispec.spec.tree_acceptors import (RecursiveTreeAcceptor, TraversalTreeAcceptor, traversal_accept)

THRESHOLD = 1e-6
V = 4
TEMPERATURES = (0.5, 1.0, 1.5)


def chain_pair(seed, sharp_p=1.5, sharp_q=1.5, V_=V):
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V_, V_, generator=g, dtype=torch.float64) * sharp_p, -1)
    Q = torch.softmax(torch.randn(V_, V_, generator=g, dtype=torch.float64) * sharp_q, -1)
    return P, Q


def test_both_are_registered_with_honest_claims():
    assert TREE_ACCEPTORS["recursive"] is RecursiveTreeAcceptor and TREE_ACCEPTORS["traversal"] is TraversalTreeAcceptor
    r, t = RecursiveTreeAcceptor(), TraversalTreeAcceptor()
    assert (r.name, r.lossless, r.children_modes, r.exact_when_greedy) == ("recursive", True, ("distinct",), True)
    assert (t.name, t.lossless, set(t.children_modes), t.exact_when_greedy) == (
        "traversal", True, {"sample", "distinct", "top"}, True)
    assert r.accepts_greedy_ids and t.accepts_greedy_ids
    assert not type("Sub", (TraversalTreeAcceptor,), {})().accepts_greedy_ids


# ---- recursive rejection sampling without replacement ------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("branching", [[2], [3], [2, 2], [3, 1]])
def test_recursive_is_exact_for_distinct_siblings(branching, temperature):
    report = check_tree_exactness("recursive", branching, "distinct", temperature=temperature, seed=1,
                                  samples=EXACTNESS_SAMPLES, threshold=THRESHOLD)
    assert report.passed and report.groups[0]["impossible"] == 0, report.format()
    assert report.speculation["paths_by_length"][1] > 1000


class NoRenormalisingRecursive(RecursiveTreeAcceptor):
    """Broken: a later sibling's law is q with the earlier tokens removed but NOT renormalised."""

    def sibling_law(self, q, removed):
        return q.masked_fill(removed, 0.0)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("branching", [[2], [3, 1]])
def test_recursive_without_renormalising_fails(branching, temperature):
    report = check_tree_exactness(NoRenormalisingRecursive, branching, "distinct", temperature=temperature, seed=1,
                                  samples=EXACTNESS_SAMPLES, threshold=THRESHOLD)
    assert not report.passed and report.p_value < 1e-30, report.format()


def honest_distinct_laws(tree, ids, Q, root):
    """[B, N, V] fp64: each node's law given its earlier siblings, computed here from Q directly."""
    B, N = ids.shape
    laws = torch.zeros(B, N, Q.shape[-1], dtype=torch.float64)
    for u in range(-1, N):
        ch = tree.children(u)
        ctx = torch.full((B,), root) if u < 0 else ids[:, u]
        for j, c in enumerate(ch):
            law = Q[ctx].clone()
            for prev in ch[:j]:
                law[torch.arange(B), ids[:, prev]] = 0.0
            laws[:, c] = law / law.sum(-1, keepdim=True)
    return laws


@pytest.mark.parametrize("branching", [[2], [3, 1], [2, 2], [3, 2]])
def test_recursive_is_multistep_on_honest_laws_and_ignores_later_siblings_node_q(branching):
    tree = TreeSpec.from_branching(branching)
    P, Q = chain_pair(12, 1.0, 4.0)
    B, N = 20_000, tree.n_nodes
    gen = torch.Generator().manual_seed(len(branching))
    ids, _, target = sample_tree(tree, P, Q, B, gen, "distinct")
    laws = honest_distinct_laws(tree, ids, Q, 0)
    target = target.double()
    u = torch.rand(B, N, generator=gen, dtype=torch.float64)
    e = torch.empty(B, V, dtype=torch.float64).exponential_(generator=gen)
    want = multistep_accept(tree, ids, laws, target, u, e)
    garbage = laws.clone()  # later siblings' node_q replaced by junk: recursive must not read it
    for parent in range(-1, N):
        for c in tree.children(parent)[1:]:
            garbage[:, c] = torch.softmax(torch.randn(B, V, generator=gen, dtype=torch.float64), -1)
    acc = RecursiveTreeAcceptor()
    assert torch.allclose(acc.sibling_laws(tree, ids, garbage), laws, atol=1e-15)
    for node_q in (laws, garbage):
        got = acc(tree, ids, node_q, target, FixedRandomness(u, e))
        # FixedRandomness hands out fp32: compare with multistep on the same fp32-rounded numbers
        ref = multistep_accept(tree, ids, laws, target, u.float(), e.float())
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    assert 0 < int((want[1] == 0).sum()) < B and int((want[1] == tree.max_depth).sum()) > 0


def test_recursive_uses_node_q_where_the_support_is_exhausted():
    """q with 2 possible tokens and 3 siblings: the third is the likeliest token not yet drawn (ties: lowest
    id) with a one-hot law, as the drafting side drafts it; the root token's law is still p."""
    p = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    q = torch.tensor([0.0, 0.7, 0.0, 0.3], dtype=torch.float64)
    tree = TreeSpec.from_branching([3])
    B = EXACTNESS_SAMPLES
    gen = torch.Generator().manual_seed(0)
    first = torch.multinomial(q.expand(B, V), 1, generator=gen)[:, 0]
    second = 4 - first  # the other possible token (1 <-> 3)
    ids = torch.stack([first, second, torch.zeros(B, dtype=torch.long)], 1)  # third: token 0, the lowest id left
    node_q = torch.stack([q.expand(B, V), torch.nn.functional.one_hot(second, V).double(),
                          torch.nn.functional.one_hot(ids[:, 2], V).double()], 1)
    target = torch.stack([p] + [torch.full((V,), 0.25, dtype=torch.float64)] * 3).expand(B, 4, V)
    acc = RecursiveTreeAcceptor()
    laws = acc.sibling_laws(tree, ids, node_q)
    assert torch.equal(laws, node_q)  # sibling 2 renormalised = its one-hot; sibling 3: empty -> node_q
    rng = lambda: FixedRandomness(torch.rand(B, 3, generator=torch.Generator().manual_seed(1)),  # noqa: E731
                                  torch.empty(B, V).exponential_(generator=torch.Generator().manual_seed(2)))
    path, count, emitted = acc(tree, ids, node_q, target, rng())
    first_token = torch.where(count > 0, ids.gather(1, path[:, :1].clamp(min=0))[:, 0], emitted)
    fit = goodness_of_fit(torch.bincount(first_token, minlength=V), p, 5.0)
    assert fit["p_chi2"] >= THRESHOLD and int((path[:, 0] == 2).sum()) > 100, fit


# ---- traversal verification --------------------------------------------------------------------------------


@pytest.mark.parametrize("children", ["sample", "distinct", "top"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("branching", [[1], [2], [3, 1], [2, 2], [2, 1, 1]])
def test_traversal_is_exact(branching, temperature, children):
    report = check_tree_exactness("traversal", branching, children, temperature=temperature, seed=6,
                                  samples=EXACTNESS_SAMPLES, threshold=THRESHOLD)
    assert report.passed and report.groups[0]["impossible"] == 0, report.format()
    if len(branching) >= 2 and children != "top":
        assert sum(report.speculation["paths_by_length"][2:]) > 1000


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("children", ["sample", "distinct"])
@pytest.mark.parametrize("branching", [[1, 1], [2, 2], [3, 1]])
def test_traversal_without_the_residual_update_fails(branching, children, temperature, monkeypatch):
    """Broken: a deleted child leaves its parent's weight and residual as they were."""
    monkeypatch.setattr(ta, "traversal_residual", lambda alpha, residual, mass, q, fallback: (alpha, residual, mass))
    report = check_tree_exactness("traversal", branching, children, temperature=temperature, seed=6,
                                  samples=EXACTNESS_SAMPLES, threshold=THRESHOLD)
    assert not report.passed and report.p_value < 1e-30, report.format()


def all_chain_drafts(P, Q, g, root=0):
    """Every draft chain of length g after ``root`` (V^g rows), with its probability under Q and the
    fp64 node_q / target_probs of a chain tree."""
    V_ = P.shape[0]
    ids = torch.tensor(list(itertools.product(range(V_), repeat=g)), dtype=torch.long)  # [V^g, g]
    ctx = torch.cat([torch.full((len(ids), 1), root), ids], 1)  # [V^g, g + 1]
    node_q = Q[ctx[:, :g]]  # [V^g, g, V]
    target = P[ctx]  # [V^g, g + 1, V]
    weight = node_q.gather(2, ids[..., None])[..., 0].prod(1)  # q(x_1..x_g)
    return ids, node_q, target, weight


def accept_length_law_from_stops(stops):  # [B, g]: test probabilities of nodes g-1..0 (tested leaf first)
    B, g = stops.shape
    law = torch.zeros(B, g + 1, dtype=stops.dtype)
    alive = torch.ones(B, dtype=stops.dtype)
    for i in range(g - 1, -1, -1):
        law[:, i + 1] = alive * stops[:, i]
        alive = alive * (1 - stops[:, i])
    law[:, 0] = alive
    return law


@pytest.mark.parametrize("g", [1, 2, 3, 4])
@pytest.mark.parametrize("pair", [(11, 1.5, 1.5), (12, 1.0, 4.0), (13, 3.0, 0.5)])
def test_traversal_on_a_chain_is_block_verification(pair, g):
    """Exact, by enumeration of every draft chain (V = 4): the accepted-length law of traversal equals
    block verification's, draft by draft; and on shared random numbers the decisions are identical."""
    P, Q = chain_pair(*pair)
    tree = TreeSpec.chain(g)
    ids, node_q, target, weight = all_chain_drafts(P, Q, g)
    B = len(ids)
    u = torch.zeros(B, g, dtype=torch.float64)
    e = torch.ones(B, V, dtype=torch.float64)
    *_, stops = traversal_accept(tree, ids, node_q, target, u, e, return_stops=True)
    terms = block_terms(ids, node_q, target)  # stop h_1..h_g: P(keep exactly i | not more)
    assert torch.allclose(stops, terms.stop, rtol=0, atol=1e-12)
    law_t = accept_length_law_from_stops(stops)
    law_b = accept_length_law_from_stops(terms.stop)
    assert torch.allclose((weight[:, None] * law_t).sum(0), (weight[:, None] * law_b).sum(0), atol=1e-12)
    assert float(weight.sum()) == pytest.approx(1.0)
    # decision for decision on fp32 inputs and shared uniforms / exponentials
    gen = torch.Generator().manual_seed(g)
    rows = 4000
    ids32, q32, p32 = sample_tree(tree, P, Q, rows, gen)
    u = torch.rand(rows, g, generator=gen)
    e = torch.empty(rows, V).exponential_(generator=gen)
    path, count, emitted = TraversalTreeAcceptor()(tree, ids32, q32, p32, FixedRandomness(u, e))
    kept, tokens = block_verify(ids32, q32, p32, u, e)
    assert torch.equal(count, kept) and torch.equal(emitted, tokens[torch.arange(rows), kept])
    assert torch.equal(path, torch.where(torch.arange(g)[None] < count[:, None], torch.arange(g)[None], -1))


def multistep_reach(tree, ids, node_q, target):
    """[B, N] fp64: P(multistep's path passes node i) for fixed drafts (exact: every test probability is
    a function of the drafts and of the earlier siblings' rejections)."""
    B, N = ids.shape
    reach = torch.zeros(B, N, dtype=torch.float64)

    def visit(u, at_u):  # at_u: P(the pass is at context u)
        r = target[:, u + 1].clone()
        for c in tree.children(u):
            rho = r / r.sum(-1, keepdim=True)
            x = ids[:, c:c + 1]
            qx, rx = node_q[:, c].gather(1, x)[:, 0], rho.gather(1, x)[:, 0]
            a = torch.where(qx > 0, (rx / qx.clamp_min(1e-300)).clamp(max=1), (rx > 0).double())
            reach[:, c] = at_u * a
            visit(c, at_u * a)
            at_u = at_u * (1 - a)
            r = (rho - node_q[:, c]).clamp(min=0)
            r = torch.where(r.sum(-1, keepdim=True) > 0, r, target[:, u + 1])

    visit(-1, torch.ones(B, dtype=torch.float64))
    return reach


def traversal_reach(tree, stops):
    """[B, N]: P(traversal's path passes node i) from the post-order test probabilities."""
    order = []

    def post(u):
        for c in tree.children(u):
            post(c)
            order.append(c)

    post(-1)
    B, N = stops.shape
    kept = torch.zeros(B, N, dtype=torch.float64)
    alive = torch.ones(B, dtype=torch.float64)
    for c in order:
        kept[:, c] = alive * stops[:, c]
        alive = alive * (1 - stops[:, c])
    reach = kept.clone()  # a node is passed if it or a descendant is kept
    for c in reversed(range(N)):
        if tree.parents[c] >= 0:
            reach[:, tree.parents[c]] += reach[:, c]
    return reach


@pytest.mark.parametrize("g", [2, 3, 4])
def test_traversal_keeps_at_least_as_many_tokens_as_multistep_on_chains(g):
    """Exact expectations by enumeration of every draft chain, over pairs with sharp and flat drafts."""
    gains = []
    for pair in [(11, 1.5, 1.5), (12, 1.0, 4.0), (13, 3.0, 0.5), (14, 2.0, 2.0), (15, 0.5, 3.0)]:
        P, Q = chain_pair(*pair)
        tree = TreeSpec.chain(g)
        ids, node_q, target, weight = all_chain_drafts(P, Q, g)
        B = len(ids)
        *_, stops = traversal_accept(tree, ids, node_q, target, torch.zeros(B, g, dtype=torch.float64),
                                     torch.ones(B, V, dtype=torch.float64), return_stops=True)
        e_trav = float((weight * traversal_reach(tree, stops).sum(1)).sum())
        e_multi = float((weight * multistep_reach(tree, ids, node_q, target).sum(1)).sum())
        p_x = target[:, :g].gather(2, ids[..., None])[..., 0]  # token-wise rule: sum_i prod_{j<=i} min(1, p/q)
        q_x = node_q.gather(2, ids[..., None])[..., 0]
        assert e_multi == pytest.approx(float((weight * (p_x / q_x).clamp(max=1).cumprod(1).sum(1)).sum()), abs=1e-12)
        assert e_trav >= e_multi - 1e-12, (pair, e_trav, e_multi)
        gains.append(e_trav - e_multi)
    assert max(gains) > 1e-3  # strictly better somewhere


@pytest.mark.parametrize("branching", [[2, 2], [3, 1], [2, 1, 1]])
def test_traversal_keeps_at_least_as_many_tokens_as_multistep_on_small_trees(branching):
    """Measured, not a theorem: exact expectations over every i.i.d.-drafted tree (V = 3, "sample")."""
    V_ = 3
    tree = TreeSpec.from_branching(branching)
    N = tree.n_nodes
    ids = torch.tensor(list(itertools.product(range(V_), repeat=N)), dtype=torch.long)  # [V^N, N]
    B = len(ids)
    ctx = torch.stack([torch.zeros(B, dtype=torch.long) if u < 0 else ids[:, u] for u in tree.parents], 1)
    for pair in [(11, 1.5, 1.5), (12, 1.0, 4.0), (14, 2.0, 2.0)]:
        P, Q = chain_pair(*pair, V_=V_)
        node_q, target = Q[ctx], torch.cat([P[torch.zeros(B, 1, dtype=torch.long)], P[ids]], 1)
        weight = node_q.gather(2, ids[..., None])[..., 0].prod(1)
        *_, stops = traversal_accept(tree, ids, node_q, target, torch.zeros(B, N, dtype=torch.float64),
                                     torch.ones(B, V_, dtype=torch.float64), return_stops=True)
        e_trav = float((weight * traversal_reach(tree, stops).sum(1)).sum())
        e_multi = float((weight * multistep_reach(tree, ids, node_q, target).sum(1)).sum())
        assert e_trav > e_multi + 1e-3, (pair, e_trav, e_multi)


def test_traversal_on_depth_one_trees_is_multistep():
    """Depth 1: the root's weight stays 1, so each child's test is multistep's min(1, r(x) / q(x))."""
    P, Q = chain_pair(12, 1.0, 4.0)
    gen = torch.Generator().manual_seed(4)
    for branching, children in (([3], "sample"), ([3], "distinct"), ([2], "top")):
        tree = TreeSpec.from_branching(branching)
        ids, q, p = sample_tree(tree, P, Q, 3000, gen, children)
        u = torch.rand(3000, tree.n_nodes, generator=gen)
        e = torch.empty(3000, V).exponential_(generator=gen)
        for a, b in zip(traversal_accept(tree, ids, q, p, u, e), multistep_accept(tree, ids, q, p, u, e)):
            assert torch.equal(a, b)


def test_golden_sequence_level_weight():
    """Hand-worked chain [1, 1] (V = 2): x_1 = 0 with p/q = .5, x_2 = 0 with p/q = 4/3: token-wise the
    path is kept with .5 * 1 = .5, by traversal with min(1, .5 * 4/3) = 2/3; after a rejected leaf the
    first node is tested with R / (R + 1 - w), where r = max(0, .5 [.6, .4] - [.45, .55]) = [0, 0]:
    R = 0, so node 0 is deleted too and the root emits from max(0, [.4, .6] - [.8, .2]) = [0, .4]: token 1."""
    tree = TreeSpec.chain(2)
    q = torch.tensor([[[0.8, 0.2], [0.45, 0.55]]], dtype=torch.float64)
    p = torch.tensor([[[0.4, 0.6], [0.6, 0.4], [0.5, 0.5]]], dtype=torch.float64)
    ids = torch.tensor([[0, 0]])
    e = torch.ones(1, 2, dtype=torch.float64)
    *_, stops = traversal_accept(tree, ids, q, p, torch.zeros(1, 2, dtype=torch.float64), e, return_stops=True)
    assert stops[0].tolist() == pytest.approx([0.0, 2 / 3])
    path, count, emitted = traversal_accept(tree, ids, q, p, torch.tensor([[0.0, 0.66]], dtype=torch.float64), e)
    assert count.tolist() == [2] and path.tolist() == [[0, 1]] and emitted.tolist() == [0]  # p(. | x_2) ties: id 0
    path, count, emitted = traversal_accept(tree, ids, q, p, torch.tensor([[0.0, 0.67]], dtype=torch.float64), e)
    assert count.tolist() == [0] and path.tolist() == [[-1, -1]] and emitted.tolist() == [1]


# ---- temperature 0 -------------------------------------------------------------------------------------------


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(seed=st.integers(0, 2**30), B=st.integers(1, 4), branching=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       V_=st.integers(1, 5))
def test_one_hot_p_and_q_decide_as_accept_tree_by_ids(seed, B, branching, V_):
    gen = torch.Generator().manual_seed(seed)
    tree = TreeSpec.from_branching(branching)
    N = tree.n_nodes
    choice = torch.randint(0, V_, (B, N + 1), generator=gen)
    ids = torch.randint(0, V_, (B, N), generator=gen)
    parent_choice = choice[:, [p + 1 for p in tree.parents]]
    ids = torch.where(torch.rand(B, N, generator=gen) < 0.5, parent_choice, ids)  # matches are common
    q = torch.nn.functional.one_hot(ids, V_).float()
    p = torch.nn.functional.one_hot(choice, V_).float()
    u = torch.where(torch.rand(B, N, generator=gen) < 0.2, 0.0, torch.rand(B, N, generator=gen))
    e = torch.empty(B, V_).exponential_(generator=gen)
    want = accept_tree_by_ids(tree, ids, choice)
    for acc in (RecursiveTreeAcceptor(), TraversalTreeAcceptor()):
        got = acc(tree, ids, q, p, FixedRandomness(u, e))
        for a, b in zip(got, want):
            assert torch.equal(a, b), acc.name
        for a, b in zip(acc.accept_greedy(tree, ids, choice), want):
            assert torch.equal(a, b)


# ---- the output contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["recursive", "traversal"])
@pytest.mark.parametrize("branching,V_", [([1], 1), ([2], 3), ([3, 1], 5), ([2, 2, 1], 7), ([1, 3, 2], 2)])
def test_outputs_keep_the_contract(name, branching, V_):
    tree = TreeSpec.from_branching(branching)
    B = 300
    ids, q, p, u, e = awkward_inputs(tree, B, V_, torch.Generator().manual_seed(len(branching) * 10 + V_))
    rng = FixedRandomness(u, e)
    path, count, emitted = TREE_ACCEPTORS[name]()(tree, ids, q, p, rng)
    assert rng.calls == [("uniforms", (B, tree.n_nodes)), ("exponentials", (B, V_))]
    D = tree.max_depth
    assert path.shape == (B, D) and count.shape == (B,) and emitted.shape == (B,)
    assert path.dtype == count.dtype == emitted.dtype == torch.long
    assert bool(((count >= 0) & (count <= D)).all()) and bool(((emitted >= 0) & (emitted < V_)).all())
    for b in range(B):
        n = int(count[b])
        nodes = path[b, :n].tolist()
        assert path[b, n:].tolist() == [-1] * (D - n)
        assert [tree.parents[c] for c in nodes] == ([-1] + nodes[:-1])[:n]  # a root-to-node path
    last = torch.where(count > 0, path.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0], -1)
    assert bool((p[torch.arange(B), last + 1, emitted] > 0).all())  # the residual lies inside p's support


@pytest.mark.parametrize("name", ["recursive", "traversal"])
def test_rows_do_not_depend_on_the_batch(name):
    tree = TreeSpec.from_branching([2, 2])
    ids, q, p, u, e = awkward_inputs(tree, 40, 5, torch.Generator().manual_seed(4))
    acc = TREE_ACCEPTORS[name]()
    full = acc(tree, ids, q, p, FixedRandomness(u, e))
    for b in range(40):
        one = acc(tree, ids[b:b + 1], q[b:b + 1], p[b:b + 1], FixedRandomness(u[b:b + 1], e[b:b + 1]))
        for a, f in zip(one, full):
            assert torch.equal(a[0], f[b])


def test_bad_shapes_raise():
    tree = TreeSpec.from_branching([2])
    for acc in (RecursiveTreeAcceptor(), TraversalTreeAcceptor()):
        with pytest.raises(ValueError, match="shape mismatch"):
            acc(tree, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 4), torch.zeros(1, 4, 4), None)
    with pytest.raises(ValueError, match="uniforms"):
        traversal_accept(tree, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 4), torch.zeros(1, 3, 4),
                         torch.zeros(1, 3), torch.ones(1, 4))


@pytest.mark.parametrize("name,children", [("recursive", "distinct"), ("traversal", "sample")])
def test_the_check_command_runs_them_by_name(name, children, capsys):
    assert main(["check", "--tree", "2,2", "--children", children, "--acceptor", name, "--samples", "20000"]) == 0
    assert f"tree acceptor {name}" in capsys.readouterr().out
