"""Token trees in the speculative loop (SpeculativeGenerator(tree=..., children=...)): greedy
identity on tiny decoders and SmolLM2, the cache invariant after kv_gather in both caches, the
exactness tier through the loop (toy chains, order 2, batch, top-k/top-p, T in {0.5, 1, 1.5}), a
compaction that is skipped failing it, per-row EOS, statistics, and refused combinations."""

import pytest
import torch

from verispec.spec import SpeculativeGenerator
from verispec.spec.checker import check_exactness
from verispec.spec.tree import TreeSpec
from verispec.testing import MarkovChainLM

NEW_TOKENS = 40
TREES = [[2, 2, 1, 1], [3, 2, 1], [1, 1, 1], "dynamic:8"]
MODES = ["sample", "distinct", "top"]


def prompts(lengths, seed=0, V=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def make(draft, target, tree, children="top", acceptor=None, **kw):
    k = 5 if str(tree).startswith("dynamic") else None
    return SpeculativeGenerator(draft, target, k, acceptor=acceptor, tree=tree, children=children, **kw)


# ---- temperature 0: every tree configuration is the target's own greedy decode -------------------------


@pytest.mark.parametrize("lengths", [(7,), (5, 11, 2)], ids=["batch1", "batch3-ragged"])
@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("draft", ["other", "self:1", "twin"])
def test_tree_greedy_equals_target_greedy_on_a_tiny_decoder(tiny_trio, lengths, tree, draft):
    target = tiny_trio["target"]
    ps = prompts(lengths)
    seq_len = max(lengths) + NEW_TOKENS
    expected = target.sample(ps, seq_len, temperature=0)
    modes = ["top"] if str(tree).startswith("dynamic") else MODES
    for children in modes:
        for acceptor in ("multistep", "greedy", "recursive", "traversal"):
            if acceptor == "recursive" and children != "distinct":
                continue
            gen = make(tiny_trio.get(draft, draft), target, tree, children, acceptor)
            out = gen.sample(ps, seq_len, temperature=0, seed=3)
            assert torch.equal(out, expected), (tree, draft, children, acceptor)
            s = gen.last_stats
            assert s.tree_passes > 0 and s.nodes_per_pass > 1
    if draft == "twin" and isinstance(tree, list):  # the draft's own weights: full-depth paths
        d = TreeSpec.from_branching(tree).max_depth
        assert s.histogram[-1] == max(s.histogram) and len(s.histogram) == d + 1


def test_tree_greedy_through_the_greedy_id_shortcut_and_the_acceptor_agree(tiny_trio, monkeypatch):
    """At temperature 0 the loop decides from argmax ids (accept_tree_by_ids); running multistep on
    the one-hot distributions instead gives the same tokens and the same statistics."""
    target, ps = tiny_trio["target"], prompts((5, 11, 2), seed=2)
    runs = []
    for shortcut in (True, False):
        gen = make(tiny_trio["other"], target, [2, 2, 1], "top", "multistep")
        with monkeypatch.context() as mp:  # restores the class's own property afterwards
            if not shortcut:
                mp.setattr(type(gen._tree_acceptor), "accepts_greedy_ids", property(lambda self: False))
            out = gen.sample(ps, 11 + 30, temperature=0, seed=1)
        assert type(gen._tree_acceptor)().accepts_greedy_ids
        s = gen.last_stats
        runs.append((out, s.accepted_drafts, list(s.histogram), s.rank_kept))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]


def test_tree_greedy_identity_with_eos_per_row(tiny_trio):
    target = tiny_trio["target"]
    ps = prompts((4, 9, 6), seed=5)
    seq_len = 9 + 40
    free = target.sample(ps, seq_len, temperature=0)
    eos = int(free[0, 4 + 10])  # a token row 0 really produces: it must stop there
    expected = target.sample(ps, seq_len, temperature=0, eos_token_id=eos)
    for tree in ([2, 2, 1], "dynamic:6"):
        out = make("self:1", target, tree).sample(ps, seq_len, temperature=0, eos_token_id=eos)
        assert torch.equal(out, expected), tree


@pytest.mark.slow
@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["batch1", "batch3-ragged"])
def test_smollm2_tree_greedy_equals_target_greedy(smollm2_f32, rows):
    model = smollm2_f32
    tok = model.tokenizer
    questions = ["Write a Python function that checks whether a string is a palindrome.",
                 "What is the capital of France? Answer in one sentence.",
                 "List three prime numbers and explain why they are prime."]
    chats = [torch.tensor(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)) for q in questions]
    ps = [chats[i] for i in rows]
    seq_len = max(len(p) for p in ps) + 32
    expected = model.sample(ps, seq_len, temperature=0)
    for draft, tree, children in (("self:8", [2, 2, 1, 1], "top"), ("self:8", [3, 2, 1], "sample"),
                                  ("self:8", "dynamic:8", "top"), ("fork", [2, 1, 1], "distinct")):
        d = model.fork() if draft == "fork" else draft
        gen = make(d, model, tree, children)
        out = gen.sample(ps, seq_len, temperature=0)
        assert torch.equal(out, expected), (draft, tree, children)
        assert gen.last_stats.tree_passes > 0


# ---- the caches after kv_gather ------------------------------------------------------------------------


@pytest.mark.parametrize("tree,children", [([2, 2, 1, 1], "sample"), ([3, 1], "distinct"), ("dynamic:6", "top")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_both_caches_hold_the_committed_tokens_after_every_tree_step(tree, children, temperature):
    """MarkovChainLM's cache is the token at each slot: after each step the target's slots
    0 .. n - 2 and the draft's valid slots must be exactly the committed tokens."""
    V, B = 5, 4
    target = MarkovChainLM.random(V, 3, order=2, batch_size=B, n_positions=64)
    draft = MarkovChainLM.random(V, 4, order=2, batch_size=B, n_positions=64)
    gen = make(draft, target, tree, children)
    ps = [torch.tensor([1, 2, 3]), torch.tensor([0]), torch.tensor([4, 4]), torch.tensor([2, 1, 0, 3])]
    steps = 0
    for _ in gen.stream(ps, 40, temperature=temperature, seed=5):
        n, toks = gen._lengths, gen._tokens
        for b in range(len(n)):
            assert torch.equal(target.cache[b, : n[b] - 1], toks[b, : n[b] - 1])
            valid = int(gen.draft.valid[b])
            assert valid >= 1 and torch.equal(draft.cache[b, :valid], toks[b, :valid])
        steps += 1
    assert steps > 5 and gen.last_stats.accepted_drafts > 0


def test_layer_skip_tree_draft_keeps_the_shared_cache_consistent():
    V = 5
    target = MarkovChainLM.random(V, 3, order=2, batch_size=3, n_positions=64)
    gen = make("self:1", target, [2, 2, 1], "sample")
    for _ in gen.stream([torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([0, 0, 4])], 30, seed=2):
        for b, n in enumerate(gen._lengths.tolist()):
            assert torch.equal(target.cache[b, : n - 1], gen._tokens[b, : n - 1])


# ---- exactness through the loop ------------------------------------------------------------------------


CASES = [
    # acceptor, draft, tree, children, temperature, top_k, top_p
    ("multistep", "model", [2, 2, 1, 1], "sample", 1.0, None, None),
    ("multistep", "model", [3, 1], "distinct", 0.5, None, None),
    ("multistep", "model", [2, 2], "top", 1.5, None, None),
    ("multistep", "model", [2, 1, 1], "sample", 1.0, 3, None),
    ("multistep", "self:1", [2, 2], "distinct", 1.0, None, 0.8),
    ("multistep", "model", "dynamic:6", "top", 1.0, None, None),
    ("recursive", "model", [3, 1], "distinct", 1.0, None, None),
    ("recursive", "model", [2, 2], "distinct", 1.5, None, 0.9),
    ("traversal", "model", [2, 2, 1], "sample", 1.0, None, None),
    ("traversal", "model", [3, 1], "distinct", 0.5, None, None),
    ("traversal", "self:1", [2, 2], "top", 1.0, 3, None),
]


@pytest.mark.parametrize("acceptor,draft,tree,children,temperature,top_k,top_p", CASES)
def test_tree_loop_is_exact(acceptor, draft, tree, children, temperature, top_k, top_p):
    dyn = str(tree).startswith("dynamic")
    report = check_exactness(acceptor, draft, 4 if dyn else None, tree=tree, children=children,
                             temperature=temperature, top_k=top_k, top_p=top_p, order=2, vocab=4, length=3,
                             samples=12_000 if dyn else 40_000, prompts=((0,), (1, 2)), seed=11)
    assert report.passed, report.format()
    assert report.speculation["tree"] and report.speculation["mean_tokens_per_pass"] > 1.2


class NoGatherTarget(MarkovChainLM):
    """Skips the target's compaction: the accepted path's tokens stay at their tree slots."""

    def kv_gather(self, src_slots, dst_start, counts):
        pass


def test_a_target_that_skips_kv_gather_fails_the_tier():
    """(The window must reach past the first tree pass: the stale slot is read by the next one.)"""
    target = NoGatherTarget.random(3, 0, order=2, batch_size=40_000, n_positions=40)
    report = check_exactness("multistep", "model", None, tree=[2, 2, 1], children="sample", order=2, vocab=3,
                             length=5, samples=40_000, target=target, seed=0)
    assert not report.passed and report.p_value < 1e-12, report.format()


def test_siblings_tested_against_the_parent_law_fail_through_the_loop():
    """multistep handed q(. | parent) for distinct siblings (not the law they were drawn from)."""
    from verispec.spec.tree import MultistepTreeAcceptor

    class ParentLaw(MultistepTreeAcceptor):
        name = "parent-law"

        def __call__(self, tree, node_ids, node_q, target_probs, rng):
            q = node_q.clone()
            for u in range(-1, tree.n_nodes):
                ch = tree.children(u)
                for c in ch[1:]:
                    q[:, c] = node_q[:, ch[0]]
            return super().__call__(tree, node_ids, q, target_probs, rng)

    report = check_exactness(ParentLaw(), "model", None, tree=[3, 1], children="distinct", order=1, vocab=4,
                             length=2, samples=40_000, seed=1, chain_seed=0)
    assert not report.passed and report.p_value < 1e-30, report.format()


# ---- statistics ----------------------------------------------------------------------------------------


def test_tree_statistics_count_depths_ranks_and_nodes():
    V = 5
    target = MarkovChainLM.random(V, 3, batch_size=200, n_positions=32)
    draft = MarkovChainLM.random(V, 4, batch_size=200, n_positions=32)
    gen = make(draft, target, [2, 1], "sample")
    gen.generate(torch.zeros(200, 1, dtype=torch.long), 12, seed=0)
    s = gen.last_stats
    assert s.tree == "[2,1]" and s.tree_passes == s.row_passes
    assert 2.0 <= s.nodes_per_pass <= 4.0  # 4 nodes, fewer where the sequence's end cuts the tree
    acc = s.rank_acceptance
    assert len(acc) == 2 and len(acc[0]) == 2 and len(acc[1]) == 1
    # rank 1 is judged only after rank 0 was rejected: fewer tries
    assert s.rank_tried[0][1] < s.rank_tried[0][0] and s.rank_kept[0][0] + s.rank_kept[0][1] == s.kept[0]
    d = s.to_dict()
    assert d["nodes_per_pass"] == s.nodes_per_pass and d["rank_acceptance"] == acc
    assert sum(s.histogram) == s.row_passes and s.mean_tokens_per_pass > 1.0


def test_record_tree_on_a_hand_worked_pass():
    from verispec.spec.stats import SpecStats

    tree = TreeSpec.from_branching([3, 1])  # nodes 0,1,2 at depth 1; 3,4,5 their children
    s = SpecStats()
    path = torch.tensor([[1, 4], [-1, -1], [0, -1]])
    count = torch.tensor([2, 0, 1])
    s.record_tree([tree] * 3, path, count)
    # depth 1: row 0 tried ranks 0, 1 (kept 1); row 1 tried 0, 1, 2 (none kept); row 2 tried 0 (kept 0)
    assert s.rank_tried[0] == [3, 2, 1] and s.rank_kept[0] == [1, 1, 0]
    # depth 2: row 0 kept node 4 (rank 0 of node 1); row 2 tried node 3 and rejected it
    assert s.rank_tried[1] == [2] and s.rank_kept[1] == [1]
    assert s.nodes_per_pass == 6


# ---- refused combinations ------------------------------------------------------------------------------


def test_combinations_that_are_not_exact_are_refused(tiny_trio):
    target, other = tiny_trio["target"], tiny_trio["other"]
    with pytest.raises(ValueError, match="dynamic tree's shape is chosen from the draft's probabilities"):
        make(other, target, "dynamic:8", "sample")
    with pytest.raises(ValueError, match="'recursive' is exact only for children in \\('distinct',\\)"):
        make(other, target, [2, 2], "sample", "recursive")
    gen = make(other, target, [2, 2], "sample", "greedy")
    with pytest.raises(ValueError, match="'greedy' is not exact at temperature 1.0"):
        gen.sample(prompts((3,)), 10, temperature=1.0)
    assert gen.sample(prompts((3,)), 10, temperature=0).shape == (1, 10)  # exact at temperature 0
    with pytest.raises(TypeError, match="cannot draft token trees"):
        make("ngram", target, [2, 2])
    with pytest.raises(ValueError, match="has depth 2, so 3 tokens a pass; k=5 conflicts"):
        SpeculativeGenerator(other, target, 5, tree=[2, 2])
    with pytest.raises(ValueError, match="children must be one of"):
        make(other, target, [2], "iid")
    with pytest.raises(ValueError, match="unknown tree acceptor"):
        make(other, target, [2], "sample", "nope")
    for bad in ("2,x", [2, 0], "dynamic:0", "dynamic:x"):
        with pytest.raises(ValueError):
            make(other, target, bad)
    with pytest.raises(TypeError, match="branching list"):
        make(other, target, 3.5)


def test_a_users_tree_acceptor_runs_and_is_checked(tiny_trio):
    """A plain function with the tree protocol: used through the adapter; a malformed path is named."""
    from verispec.spec.tree import multistep_accept

    def mine(tree, node_ids, node_q, target_probs, rng):
        B, N = node_ids.shape
        return multistep_accept(tree, node_ids, node_q, target_probs, rng.uniforms(B, N), rng.exponentials(B, node_q.shape[-1]))

    target = MarkovChainLM.random(5, 0, batch_size=2, n_positions=32)
    draft = MarkovChainLM.random(5, 1, batch_size=2, n_positions=32)
    out = make(draft, target, [2, 1], "sample", mine).sample(torch.zeros(2, 1, dtype=torch.long), 12, seed=0)
    assert out.shape == (2, 12)

    def broken(tree, node_ids, node_q, target_probs, rng):
        B = node_ids.shape[0]
        return torch.full((B, 2), 3), torch.full((B,), 2), torch.zeros(B, dtype=torch.long)  # 3 is not a root child

    with pytest.raises(ValueError, match="not a root-to-node path"):
        make(draft, target, [2, 1], "sample", broken).sample(torch.zeros(2, 1, dtype=torch.long), 12, seed=0)


def test_trees_near_the_cache_end_shrink_and_stay_exact_in_length():
    """Rows near n_positions / sequence_length get a breadth-first prefix of the tree (or no draft)."""
    target = MarkovChainLM.random(5, 0, batch_size=2, n_positions=12)
    draft = MarkovChainLM.random(5, 1, batch_size=2, n_positions=12)
    gen = make(draft, target, [2, 2, 2], "sample")
    out = gen.sample(torch.zeros(2, 1, dtype=torch.long), 12, seed=0)
    assert out.shape == (2, 12) and int(out.min()) >= 0
    assert TreeSpec.from_branching([2, 2]).truncated(1, 10).n_nodes == 2
    assert TreeSpec.from_branching([2, 2]).truncated(2, 3).parents == (-1, -1, 0)
    assert TreeSpec.from_branching([2, 2]).truncated(0, 3) is None


# ---- k="auto" with tree="auto": the policy picks the shape ---------------------------------------------


def test_auto_shape_is_exact_and_greedy_identical(tiny_trio):
    report = check_exactness("multistep", "model", "auto:4", tree="auto", children="sample", order=2, vocab=4,
                             length=3, samples=40_000, seed=4)
    assert report.passed, report.format()
    target = tiny_trio["target"]
    ps = prompts((5, 11, 2))
    expected = target.sample(ps, 11 + NEW_TOKENS, temperature=0)
    gen = SpeculativeGenerator(tiny_trio["other"], target, "auto:5", tree="auto")
    assert torch.equal(gen.sample(ps, 11 + NEW_TOKENS, temperature=0), expected)
    assert gen.last_stats.tree == "auto" and sum(gen.last_stats.shape_counts.values()) > 0


@pytest.mark.parametrize("acceptor,chain_rule", [("traversal", "block"), ("multistep", "default")])
def test_auto_shape_runs_its_chains_through_the_chain_step(tiny_trio, monkeypatch, acceptor, chain_rule):
    """The chains tree="auto" picks are drafted a token a forward by the chain step, under the tree
    acceptor's rule on a chain (traversal: block verification; multistep: token-wise), and its
    policy learns them as chain trees; the output stays exact (chi-square) and greedy-identical."""
    report = check_exactness(acceptor, "model", "auto:4", tree="auto", children="sample", order=2, vocab=4,
                             length=3, samples=40_000, seed=5)
    assert report.passed, report.format()
    target = tiny_trio["target"]
    gen = SpeculativeGenerator(tiny_trio["other"], target, "auto:5", tree="auto", acceptor=acceptor)
    assert gen._auto_chain is not None and gen._auto_chain.name == chain_rule
    routes = []
    real = SpeculativeGenerator._chain_step

    def counting(self, k, acceptor=None):
        routes.append((k, acceptor is not None and acceptor is self._auto_chain))
        return real(self, k, acceptor)

    monkeypatch.setattr(SpeculativeGenerator, "_chain_step", counting)
    ps = prompts((5, 11, 2))
    expected = target.sample(ps, 11 + NEW_TOKENS, temperature=0)
    assert torch.equal(gen.sample(ps, 11 + NEW_TOKENS, temperature=0), expected)
    gen.sample(ps, 11 + NEW_TOKENS, temperature=1.0, seed=0)
    chains = [k for k, twin in routes if twin]
    assert chains and min(chains) >= 2, routes
    learned = [parents for parents in gen.policy.draft_s_by_shape if TreeSpec(parents).branching == [1] * len(parents)]
    assert learned  # the chain passes reached the policy as chain trees
    assert sum(gen.last_stats.shape_counts.values()) > 0


def test_auto_shape_prefers_a_tree_when_siblings_pay_and_a_chain_when_they_do_not():
    """The rule on hand-set beliefs: flat verify costs (an accelerator) and first-child acceptance
    0.5 with second children accepted 0.5 of the time after a rejection -> a tree; the same with
    verify seconds growing per token (this CPU with a big target) -> a chain."""
    from verispec.spec.tree_policy import AdaptiveTree

    def policy(verify):
        p = AdaptiveTree(max_k=4, trees=[[2, 2, 1], [3, 1, 1]], prior_acceptance=0.5, rank_prior=1.0)
        p.costs.calibrate(verify, list(range(1, p.largest + 1)))
        p.draft_s_per_position = 0.01
        return p

    flat = policy(lambda k: 1.0)
    shape = flat.next_shape()
    assert shape is not None and shape.branching in ([2, 2, 1], [3, 1, 1]), flat.last_choice
    steep = policy(lambda k: 1.0 + 0.25 * k)
    shape = steep.next_shape()
    assert shape is not None and shape.branching is not None and max(shape.branching) == 1, steep.last_choice
    # expected tokens: chain [1,1,1] at a = 0.5 is 1 + .5 + .25 + .125
    assert abs(flat.expected_tokens(TreeSpec.chain(3)) - 1.875) < 1e-9
    # [2, 1]: s_1 = 1 - .5 * .5 = .75, then .75 * .5
    assert abs(flat.expected_tokens(TreeSpec.from_branching([2, 1])) - (1 + 0.75 + 0.375)) < 1e-9


def test_auto_shape_learns_sibling_ranks_from_passes():
    from verispec.spec.tree_policy import AdaptiveTree

    p = AdaptiveTree(max_k=3, trees=[[2, 1]], rank_prior=0.5, rank_shrink=0.0)
    tree = TreeSpec.from_branching([2, 1])  # nodes 0, 1 at depth 1; 2, 3 below them
    p.next_shape()
    # row 0: rank 0 rejected, rank 1 accepted, then its child accepted; row 1: both rejected
    p.observe_tree([tree, tree], torch.tensor([[1, 3], [-1, -1]]), torch.tensor([2, 0]), 0.01, 0.02)
    assert p.rank_reached[0][1] == 2.0 and p.rank_kept[0][1] == 1.0
    assert p.rank_acceptance()[0][1] == 0.5
    assert p.reached[0] == 2.0 and p.kept[0] == 0.0  # rank 0 judged twice, never kept
    assert p.reached[1] == 1.0 and p.kept[1] == 1.0  # depth 2 via node 1: its only child kept
    assert p.draft_s_by_shape[tree.parents] == 0.01


def test_auto_shape_refuses_a_fixed_k():
    with pytest.raises(ValueError, match="tree='auto' chooses the shape each step"):
        SpeculativeGenerator(MarkovChainLM.random(4, 1), MarkovChainLM.random(4, 0), 4, tree="auto")


# ---- Hypothesis: random exact configurations through the loop ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXACT_PAIRS = [("multistep", "sample"), ("multistep", "distinct"), ("multistep", "top"), ("recursive", "distinct"),
               ("traversal", "sample"), ("traversal", "distinct"), ("traversal", "top")]


@settings(derandomize=True, max_examples=10, deadline=None, database=None)
@given(pair=st.sampled_from(EXACT_PAIRS), branching=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       temperature=st.sampled_from([0.5, 1.0, 1.5]), top_k=st.sampled_from([None, 2]), order=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_random_exact_tree_configurations_pass_through_the_loop(pair, branching, temperature, top_k, order, seed):
    acceptor, children = pair  # (top_k=2 with 3 distinct siblings: the third is the exhausted-support fallback)
    report = check_exactness(acceptor, "model", None, tree=branching, children=children, temperature=temperature,
                             top_k=top_k, order=order, vocab=3, length=3, samples=20_000, seed=seed,
                             prompts=((0,), (2, 1)))
    assert report.passed, report.format()
