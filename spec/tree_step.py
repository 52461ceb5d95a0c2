"""Token trees in the speculative loop: one step drafts a tree per row, the target scores every node
in one forward, a tree acceptor keeps one root-to-node path, and both caches move that path next
to the prefix (``kv_gather``).

Slots and positions (n = a row's committed tokens; its cache holds slots 0 .. n - 2):

    verify block   [last committed token, node 0, .., node N - 1] at slots n - 1 .. n - 1 + N
    RoPE position  n - 1 + depth (depth 0 for the last token: position_ids, not slot order)
    active_mask    [B, N + 1, N + 1]: the last token sees itself; node i sees the last token,
                   its ancestors and itself (every query also sees the prefix, slots < n - 1)
    after a path of a nodes: kv_gather moves slots n + path[0 .. a - 1] to n .. n + a - 1, so the
    cache holds slots 0 .. n + a - 1 = 0 .. n' - 2 with n' = n + a + 1: the chain invariant.

Rows may carry different trees (``tree="dynamic:N"``): masks and positions are per row, and the
acceptor is called once per group of rows sharing a topology.
"""

from __future__ import annotations

import logging

import torch

from .resolve import make_tree_acceptor
from ..model.sampling import SamplingParams
from .tree import DynamicTree, TreeSpec, parse_tree
from .tree_policy import auto_tree_policy

log = logging.getLogger("verispec.spec")


def resolve_tree(tree, children: str, acceptor, max_k: int | None):
    """Check ``tree=`` / ``children=`` / ``acceptor=`` together -> (shape, tree acceptor). Combinations
    the acceptor does not claim exact are refused, with the reason."""
    from .tree import CHILDREN_MODES

    shape = "auto" if tree == "auto" else parse_tree(tree, None if max_k is None else max(1, max_k - 1))

    if children not in CHILDREN_MODES:
        raise ValueError(f"children must be one of {CHILDREN_MODES}, got {children!r}")
    if isinstance(shape, DynamicTree) and children != "top":
        raise ValueError(f"tree={str(shape)!r} with children={children!r} is not exact: a dynamic tree's shape is "
                         "chosen from the draft's probabilities of the tokens in it, so sampled siblings kept by "
                         "that choice are no longer draws from q; use children='top' (EAGLE-2's deterministic "
                         "children)")
    acc = make_tree_acceptor(acceptor)
    if acc.lossless and children not in acc.children_modes:
        raise ValueError(f"tree acceptor {acc.name!r} is exact only for children in {tuple(acc.children_modes)}, "
                         f"not {children!r} (docs/exactness.md: each rule needs the siblings drawn as it assumes)")
    return shape, acc


def tree_verify_inputs(trees: list, last: torch.Tensor, node_ids: torch.Tensor, n: torch.Tensor):
    """-> (ids [B, N + 1], mask [B, N + 1, N + 1] bool, position_ids [B, N + 1]) of the verify pass."""
    B, N = node_ids.shape
    ids = torch.cat([last, node_ids.cpu()], 1)
    mask = torch.zeros(B, N + 1, N + 1, dtype=torch.bool)
    depth = torch.zeros(B, N + 1, dtype=torch.long)
    mask[:, :, 0] = True
    for tree, rows in groups(trees):
        mask[rows, 1:, 1:] = tree.ancestors_mask()
        depth[rows, 1:] = torch.tensor(tree.depth, dtype=torch.long)
    return ids, mask, (n - 1)[:, None] + depth


def groups(trees: list) -> list[tuple[TreeSpec, torch.Tensor]]:
    """Rows sharing one topology (the same object, or equal parents) -> [(tree, rows [r])]."""
    out: dict[tuple, tuple[TreeSpec, list[int]]] = {}
    for b, t in enumerate(trees):
        out.setdefault(t.parents, (t, []))[1].append(b)
    return [(t, torch.tensor(rows, dtype=torch.long)) for t, rows in out.values()]


def check_tree_output(tree: TreeSpec, path, count, emitted, R: int, V: int) -> None:
    """A tree acceptor's (path [R, D], count [R], emitted [R]): shapes, a root-to-node chain of the
    tree, and the emitted id in the vocabulary."""
    D = tree.max_depth
    if tuple(path.shape) != (R, D) or tuple(count.shape) != (R,) or tuple(emitted.shape) != (R,):
        raise ValueError(f"tree acceptor returned path {tuple(path.shape)}, count {tuple(count.shape)}, emitted "
                         f"{tuple(emitted.shape)}; expected [{R}, {D}], [{R}], [{R}]")
    if path.dtype.is_floating_point or count.dtype.is_floating_point or emitted.dtype.is_floating_point:
        raise TypeError("tree acceptor must return integer tensors")
    if R and (int(emitted.min()) < 0 or int(emitted.max()) >= V):
        raise ValueError(f"tree acceptor emitted a token id outside [0, {V})")
    if R and (int(count.min()) < 0 or int(count.max()) > D):
        raise ValueError(f"tree acceptor returned a count outside 0..{D}")
    parents = torch.tensor(tree.parents, dtype=torch.long)
    path, count = path.long().cpu(), count.long().cpu()
    for i in range(D):
        on = count > i  # [R] rows whose path has an i-th node
        node = path[:, i]
        prev = path[:, i - 1] if i else torch.full_like(node, -1)
        bad = on & ((node < 0) | (node >= tree.n_nodes) | (parents[node.clamp(0, tree.n_nodes - 1)] != prev))
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"tree acceptor returned path {path[r, :int(count[r])].tolist()} for row {r}: not a "
                             f"root-to-node path of the tree (node {int(node[r])} is not a child of {int(prev[r])})")


class TreeSteps:
    """The generator's tree step (mixed into SpeculativeGenerator)."""

    @staticmethod
    def _tree_k(tree, k):
        """k with a tree: a static tree's depth d sets k = d + 1 (a k given must agree); a dynamic
        tree's depth is k - 1 (k given, or the target's default)."""
        if tree == "auto":
            return auto_tree_policy(k)
        spec = parse_tree(tree)
        if isinstance(spec, DynamicTree):
            return k
        if k is not None and k != spec.max_depth + 1:
            raise ValueError(f"tree {spec} has depth {spec.max_depth}, so {spec.max_depth + 1} tokens a pass; k={k!r} "
                             "conflicts (omit k with a static tree)")
        return spec.max_depth + 1

    def _check_tree_acceptor(self, params: SamplingParams) -> None:
        acc = self._tree_acceptor
        if params.greedy and acc.exact_when_greedy:
            return
        if acc.lossless is False:
            raise ValueError(f"tree acceptor {acc.name!r} is not exact at temperature {params.temperature}: it is "
                             "exact only at temperature 0 (use 'multistep', 'recursive' or 'traversal')")
        if acc.lossless is None:
            log.warning("tree acceptor %s makes no exactness claim; check it with `verispec check --tree`", acc.name)

    def _tree_room(self, n: torch.Tensor):
        """The pass's shape within the cache and the sequence: a static tree cut to its first nodes
        (breadth-first) that fit, a dynamic one with fewer nodes / levels; None: no room for a node."""
        nodes = min(self.n_positions - int(n.max()), self._draft_room(n))
        depth = self._seq_len - 1 - int(n.min())
        shape = self.policy.next_shape() if self._tree == "auto" else self._tree
        if shape is None:  # the policy chose a pass without drafts
            return None
        if isinstance(shape, TreeSpec):
            return shape.truncated(depth, nodes)
        depth = min(depth, shape.max_depth)
        while depth > 1 and shape.width * (depth - 1) > nodes:  # the expanded nodes are fed at slots n ..
            depth -= 1
        if depth < 1 or nodes < 1:
            return None
        return DynamicTree(min(shape.n_nodes, nodes), depth, shape.width)

    def _draft_room(self, n: torch.Tensor) -> int:
        limit = self.draft.n_positions
        return 1 << 30 if limit is None else limit - int(n.max())

    def _tree_step(self):
        clock, stats, n = self._clock, self._stats, self._lengths
        shape = self._tree_room(n)
        if shape is None:  # no room for a node, or the policy's choice: a pass without drafts
            return self._chain_step(1)
        if self._auto_chain is not None and shape.branching is not None and set(shape.branching) == {1}:
            return self._chain_step(shape.max_depth + 1, self._auto_chain)  # tree="auto" chose a chain
        clock.start()
        self._rng.acceptor.at(self._rows, n)
        prop = self.draft.propose_tree(self._tokens, n, shape, self._children, self._params, self._rng.draft)
        B, V = len(n), self.target.vocab_size
        _check_tree_proposal(prop, B, V)
        draft_s = clock.lap("draft_s")

        last = self._tokens.gather(1, (n - 1)[:, None])  # [B, 1]
        ids, mask, position_ids = tree_verify_inputs(prop.trees, last, prop.node_ids, n)
        logits = self.target.forward(ids, n - 1, active_mask=mask, position_ids=position_ids)  # [B, N + 1, V]
        target_out = self._target_side(logits)
        target_s = clock.lap("target_s")
        N = prop.node_ids.shape[1]
        stats.target_s_by_k[N + 1] = stats.target_s_by_k.get(N + 1, 0.0) + target_s

        path, count, new = self._accept_tree(prop, target_out)  # [B, D], [B], [B, D + 1]
        clock.lap("accept_s")
        self.target.kv_gather(n[:, None] + path.clamp(min=0), n, count)
        self.draft.commit_tree(path, count)
        stats.record(path.shape[1] + 1, count)
        stats.record_tree(prop.trees, path, count)
        if self._tree == "auto":  # the shape policy learns per depth and sibling rank
            self.policy.observe_tree(prop.trees, path, count, draft_s, target_s)
        else:
            self.policy.observe(path.shape[1] + 1, count, draft_s, target_s)
        return self._commit(count, new)

    def _observe_auto_chain(self, g: int, accepted: torch.Tensor, draft_s: float, target_s: float) -> None:
        """tree="auto"'s policy after a chain pass of g drafts: the chain tree's path is its first
        ``accepted`` nodes."""
        ar = torch.arange(g)[None]
        path = torch.where(ar < accepted[:, None], ar, -1)
        trees = [TreeSpec.chain(g)] * len(accepted)
        self._stats.record_tree(trees, path, accepted)
        self.policy.observe_tree(trees, path, accepted, draft_s, target_s)

    def _accept_tree(self, prop, target_out):
        """The tree acceptor per group of rows sharing a topology -> path [B, D], count [B] and the
        committed tokens [B, D + 1] (the path's tokens, the emitted one, -1), on the CPU."""
        node_ids = prop.node_ids.to(self.device)
        B = node_ids.shape[0]
        D = max(t.max_depth for t in prop.trees)
        path = torch.full((B, D), -1, dtype=torch.long)
        count = torch.zeros(B, dtype=torch.long)
        emitted = torch.zeros(B, dtype=torch.long)
        V = self.target.vocab_size
        for tree, rows in groups(prop.trees):
            N = tree.n_nodes
            if len(rows) == B and N == node_ids.shape[1]:  # one topology for all rows: no copies
                pick = lambda t, m: t  # noqa: E731
            else:
                r = rows.to(self.device)
                pick = lambda t, m: t[r, :m]  # noqa: E731
            ids_r = pick(node_ids, N)
            if self._by_ids:
                p_r, c_r, e_r = self._tree_acceptor.accept_greedy(tree, ids_r, pick(target_out, N + 1))
            else:
                p_r, c_r, e_r = self._tree_acceptor(tree, ids_r, pick(prop.node_q, N).to(self.device),
                                                    pick(target_out, N + 1), self._rng.acceptor)
            check_tree_output(tree, p_r, c_r, e_r, len(rows), V)
            path[rows, :tree.max_depth] = p_r.long().cpu()
            count[rows] = c_r.long().cpu()
            emitted[rows] = e_r.long().cpu()
        if self._parallel:  # every rank commits rank 0's decisions
            both = self.target.sync_tokens(torch.cat([count[:, None], emitted[:, None], path], 1))
            count, emitted, path = both[:, 0], both[:, 1], both[:, 2:]
        ar = torch.arange(D + 1)
        toks = prop.node_ids.cpu().gather(1, path.clamp(min=0))  # [B, D]
        new = torch.cat([toks, torch.zeros(B, 1, dtype=torch.long)], 1)
        new = torch.where(ar[None] < count[:, None], new, -1)
        new[torch.arange(B), count] = emitted
        return path, count, new


def _check_tree_proposal(prop, B: int, V: int) -> None:
    ids, q = prop.node_ids, prop.node_q
    if len(prop.trees) != B or ids.dim() != 2 or ids.shape[0] != B or tuple(q.shape) != (*ids.shape, V):
        raise ValueError(f"draft's tree proposal has {len(prop.trees)} trees, node_ids {tuple(ids.shape)}, node_q "
                         f"{tuple(q.shape)}; expected {B} trees, [B={B}, N] and [B, N, V={V}]")
    if any(t.n_nodes > ids.shape[1] for t in prop.trees):
        raise ValueError("draft's tree proposal has a tree with more nodes than node_ids holds")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"draft proposed a tree token id outside [0, {V})")
    if torch.isnan(q).any():
        raise FloatingPointError("draft returned NaN tree probabilities")
