"""``k="auto"`` with ``tree="auto"``: each step the policy picks a chain length or a token tree.

:class:`AdaptiveTree` extends :class:`~verispec.spec.policy.AdaptiveK`'s rule, expected tokens
per second, to trees. For a static tree with branching [b_1, .., b_d] (a chain: all b_i = 1):

    s_i  = 1 - prod_{r < b_i} (1 - a_i,r)          P(some child at depth i is accepted | depth i-1 reached)
    E    = 1 + sum_{j=1..d} prod_{i=1..j} s_i       expected tokens per row and pass
    T    = draft_s(shape) + verify_s(N + 1) + overhead_s
    pick = argmax E / T   over k = 1, the chains of depth 1 .. max_k - 1, and the candidate trees

a_i,0 is the online acceptance at depth i (chains and the first child of a tree pass teach it
alike); a_i,r for r >= 1 is the online acceptance of the r-th sibling after r rejected ones, at
depth i, shrunk towards ``rank_prior`` x a_i,0 (a rejected sibling leaves a residual on which the
next one is accepted less often). verify_s comes from the same verify-cost table as k, calibrated
up to the largest tree; a shape's draft seconds are its depth x the draft's seconds per level until
that shape has run, then its own online average. The choice is made before the step draws a random
number, so every step is exact whatever it picks (a chain runs through the generator's chain step
under the tree acceptor's ``chain_acceptor``, or, without one, as a tree with one child per node). Every ``explore_every`` steps the best shape not run for
``4 * explore_every`` steps among the runner-ups runs once, so its cost and acceptance stay
measured.
"""

from __future__ import annotations

import time

import torch

from .policy import AdaptiveK
from .tree import TreeSpec

DEFAULT_TREES = ([2, 1], [2, 1, 1], [2, 2, 1], [3, 1, 1], [2, 2, 1, 1], [3, 2, 1], [2, 1, 1, 1, 1], [4, 1, 1])


class AdaptiveTree(AdaptiveK):
    """Chooses k = 1, a chain of depth 1 .. max_k - 1, or one of ``trees`` (branching lists of at
    most 16 nodes and depth <= max_k - 1) before each step; see the module docstring."""

    def __init__(self, max_k: int = 8, trees=DEFAULT_TREES, rank_prior: float = 0.5, rank_shrink: float = 4.0,
                 **kw):
        super().__init__(max_k=max_k, gate=False, **kw)
        shapes = [TreeSpec.from_branching(b) if not isinstance(b, TreeSpec) else b for b in trees]
        for t in shapes:
            if t.n_nodes > 16:
                raise ValueError(f"candidate tree {t} has {t.n_nodes} nodes; at most 16")
        self.trees = [t for t in shapes if t.max_depth <= max_k - 1]
        self.chains = [TreeSpec.chain(g) for g in range(1, max_k)]
        self.largest = max([t.n_nodes for t in self.trees + self.chains]) + 1  # tokens of the largest pass
        if not 0.0 <= rank_prior <= 1.0 or rank_shrink < 0:
            raise ValueError(f"rank_prior must be in [0, 1] and rank_shrink >= 0, got {rank_prior}, {rank_shrink}")
        self.rank_prior, self.rank_shrink = rank_prior, rank_shrink
        width = max([max(t.branching or [1]) for t in self.trees] + [1])
        self.rank_reached = [[0.0] * width for _ in range(max_k - 1)]  # [depth - 1][rank >= 1 at index r]
        self.rank_kept = [[0.0] * width for _ in range(max_k - 1)]
        self.draft_s_by_shape: dict[tuple, float] = {}
        self._ran: dict[tuple, int] = {}  # shape parents -> step it last ran
        self.last_shape: TreeSpec | None = None

    def __repr__(self) -> str:
        return f"AdaptiveTree(max_k={self.max_k}, trees={len(self.trees)})"

    def calibrate(self, time_verify, batch: int, largest_k: int | None = None) -> None:
        top = min(self.largest, largest_k or self.largest)
        self.costs.calibrate(time_verify, list(range(1, top + 1)))
        self.calibrated_batch = batch

    def _verify_table(self) -> dict[int, float]:
        return self.costs.table(self.largest)

    def rank_acceptance(self) -> list[list[float]]:
        """[depth - 1][r]: a_i,r (r = 0: the position acceptance)."""
        out = []
        for d, a0 in enumerate(self.position_acceptance()):
            row = [a0]
            for r in range(1, len(self.rank_reached[d])):
                prior = a0 * self.rank_prior**r
                kept, reached = self.rank_kept[d][r], self.rank_reached[d][r]
                row.append((kept + self.rank_shrink * prior) / (reached + self.rank_shrink) if reached + self.rank_shrink
                           else prior)
            out.append(row)
        return out

    def expected_tokens(self, tree: TreeSpec, acc: list[list[float]] | None = None) -> float:
        acc = self.rank_acceptance() if acc is None else acc
        expected, reach = 1.0, 1.0
        for i, b in enumerate(tree.branching or []):
            miss = 1.0
            for r in range(b):
                miss *= 1.0 - acc[i][min(r, len(acc[i]) - 1)]
            reach *= 1.0 - miss
            expected += reach
        return expected

    def _draft_s(self, tree: TreeSpec) -> float:
        own = self.draft_s_by_shape.get(tree.parents)
        return own if own is not None else tree.max_depth * (self.draft_s_per_position or 0.0)

    def next_shape(self) -> TreeSpec | None:
        """The pass's shape: a TreeSpec (a chain or a tree), or None for a pass without drafts."""
        self._asked_at = time.perf_counter()
        self._step += 1
        if self.draft_s_per_position is None or not self.costs:
            self.last_shape = self.chains[min(self.start_k, self.max_k) - 2] if self.start_k > 1 else None
            return self.last_shape
        acc, verify = self.rank_acceptance(), self._verify_table()
        table = {(): 1.0 / (verify[1] + self.overhead_s)}
        shapes = {(): None}
        for t in self.chains + self.trees:
            if t.n_nodes + 1 in verify:
                seconds = self._draft_s(t) + verify[t.n_nodes + 1] + self.overhead_s
                table[t.parents] = self.expected_tokens(t, acc) / seconds
                shapes[t.parents] = t
        ranked = sorted(table, key=table.get, reverse=True)
        best = ranked[0]
        if self._step % self.explore_every == 0:  # now and then a runner-up that has not run lately
            stale = [s for s in ranked[1:4] if self._step - self._ran.get(s, 0) > 4 * self.explore_every]
            best = stale[0] if stale else best
        self._ran[best] = self._step
        self.last_choice = {str(shapes[s] or "k=1"): rate for s, rate in table.items()}
        self.last_shape = shapes[best]
        return self.last_shape

    def next_k(self) -> int:  # a chain-only caller (the pass without drafts) asks for k
        shape = self.next_shape()
        return 1 if shape is None else shape.max_depth + 1

    def observe_tree(self, trees: list, path: torch.Tensor, count: torch.Tensor, draft_s: float, target_s: float) -> None:
        """After a tree (or chain-as-tree) pass: acceptance per depth and sibling rank, the shape's
        draft seconds, the verify cost of N + 1 tokens."""
        tree = trees[0]
        self._decay_acceptance()
        for d in range(len(self.rank_reached)):
            self.rank_reached[d] = [x * self.decay for x in self.rank_reached[d]]
            self.rank_kept[d] = [x * self.decay for x in self.rank_kept[d]]
        for t, row, c in zip(trees, path.tolist(), count.tolist()):
            u = -1
            for d in range(min(c + 1, t.max_depth)):  # the depths whose siblings were judged
                siblings = t.children(u)
                if not siblings:
                    break
                last = siblings.index(row[d]) if d < c else len(siblings) - 1  # the last rank judged
                self.reached[d] += 1.0  # rank 0 was judged: the position acceptance at depth d + 1
                self.kept[d] += float(d < c and last == 0)
                for r in range(1, min(last, len(self.rank_reached[d]) - 1) + 1):
                    self.rank_reached[d][r] += 1.0
                if d < c and 1 <= last < len(self.rank_kept[d]):
                    self.rank_kept[d][last] += 1.0
                if d >= c:
                    break
                u = row[d]
        self._observe_costs(tree.n_nodes + 1, tree.max_depth, draft_s, target_s)
        s = self.smoothing
        prev = self.draft_s_by_shape.get(tree.parents)
        self.draft_s_by_shape[tree.parents] = draft_s if prev is None else (1 - s) * prev + s * draft_s


def auto_tree_policy(k) -> AdaptiveTree:
    """``tree="auto"``'s policy from ``k``: None / "auto" / "auto:MAX" / an AdaptiveTree."""
    if isinstance(k, AdaptiveTree):
        return k
    if k is None or k == "auto":
        return AdaptiveTree()
    if isinstance(k, str) and k.startswith("auto:") and k[5:].isdigit() and int(k[5:]) >= 2:
        return AdaptiveTree(max_k=int(k[5:]))
    raise ValueError(f"tree='auto' chooses the shape each step: k must be None, 'auto', 'auto:MAX' (MAX >= 2) or an "
                     f"AdaptiveTree, got {k!r}")
