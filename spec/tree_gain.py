"""``PairedTreeGain``: how many tokens per pass a tree acceptor keeps, against the chain hidden in
the same tree, from the same drafts.

A tree drafted with ``children="sample"`` or ``"distinct"`` contains a chain: the path of first
children. The first sibling is a draw from q(. | its parent's context) in both modes (i.i.d. draws;
without replacement, the first pick is a q-sample), so the first-child path of depth d is distributed as the
drafts of a chain with k = d + 1. For that path, given the pass's context, the expected drafts kept
by token-wise rejection sampling are E[sum_i t_i] and by block verification E[sum_i w_i]
(``spec/block.py``, ``PairedBlockGain``): sum_i t_i and sum_i w_i on the path are unbiased
estimates, paired with the tree. The tree acceptor's own expected path length given the drafted
tree is estimated by re-running it ``samples`` times on the same inputs with private uniforms
(its decisions in the generator use the generator's stream, untouched, so the wrapped acceptor
emits what the plain one does).

Both estimates come from the same drafts and the same context, so the ratio of their means over a
run compares "this tree" with "the chain of its depth" without the noise of two runs decoding
different texts. It costs ``samples`` extra acceptor calls per pass: use it in acceptance runs
(``verispec bench tree-gain``), not in timed ones.
"""

from __future__ import annotations

import math

import torch

from .block import _compute_dtype, block_weights, token_wise_weights
from .protocols import read_through
from .tree import TreeAcceptorBase

CHAIN_MODES = ("sample", "distinct")  # the first sibling is a q-sample: the first-child path is a chain draft


class _PrivateRandomness:
    """The tree acceptor protocol's two streams from a private generator (the race stream is
    constant: the emitted token does not change the path length)."""

    def __init__(self, generator: torch.Generator, device):
        self._gen = generator
        self.device = device

    def uniforms(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen, dtype=torch.float32).to(self.device)

    def exponentials(self, *shape: int) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float32, device=self.device)


def first_child_path(parents) -> list[int]:
    """Node indices of the first-child path from the root (breadth-first order: the lowest index)."""
    first: dict[int, int] = {}
    for i, parent in enumerate(parents):
        first.setdefault(parent, i)
    path, node = [], -1
    while node in first:
        node = first[node]
        path.append(node)
    return path


def _ratio_and_se(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """mean(a) / mean(b) and its delta-method standard error for paired samples."""
    n = len(a)
    if not n or not sum(b):
        return None, None
    ma, mb = sum(a) / n, sum(b) / n
    r = ma / mb
    if n < 2:
        return r, None
    resid = [x - r * y for x, y in zip(a, b)]
    var = sum(e * e for e in resid) / (n - 1)
    return r, math.sqrt(var / n) / mb


class PairedTreeGain(TreeAcceptorBase):
    """Wraps a tree acceptor (decides nothing itself); see the module docstring. ``children``: the
    generator's sibling sampler (the chain estimates need "sample" or "distinct"; with "top" only
    the tree's own estimates are kept). ``summary()`` gives the totals; ``reset()`` clears them."""

    def __init__(self, inner, children: str, samples: int = 16, seed: int = 0):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.inner = inner
        self.children = children
        self.samples = samples
        self._gen = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []  # one per row-pass: depth, nodes, realised, expected, chain_t, chain_w

    name = read_through("name", "tree acceptor")  # the wrapped acceptor's members
    lossless = read_through("lossless", None)
    children_modes = read_through("children_modes", ())
    exact_when_greedy = read_through("exact_when_greedy", False)
    accepts_greedy_ids = read_through("accepts_greedy_ids", False)

    def accept_greedy(self, tree, node_ids, choice):
        return self.inner.accept_greedy(tree, node_ids, choice)

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        path, count, emitted = self.inner(tree, node_ids, node_q, target_probs, rng)
        with torch.no_grad():
            expected = self._expected_count(tree, node_ids, node_q, target_probs)  # [B]
            chain_t, chain_w = self._chain(tree, node_ids, node_q, target_probs)
        for b in range(node_ids.shape[0]):
            self.rows.append({"depth": tree.max_depth, "nodes": len(tree.parents), "realised": int(count[b]),
                              "expected": float(expected[b]),
                              "chain_depth": None if chain_t is None else len(first_child_path(tree.parents)),
                              "chain_t": None if chain_t is None else float(chain_t[b]),
                              "chain_w": None if chain_w is None else float(chain_w[b])})
        return path, count, emitted

    def _expected_count(self, tree, node_ids, node_q, target_probs) -> torch.Tensor:
        """Mean kept path length over ``samples`` re-runs with private uniforms, [B] fp64."""
        B, N, V = node_q.shape
        rng = _PrivateRandomness(self._gen, node_q.device)
        per_call = max(1, min(self.samples, (1 << 28) // max(1, B * N * V * 4)))  # replicas per call (memory)
        total = torch.zeros(B, dtype=torch.float64)
        done = 0
        while done < self.samples:
            m = min(per_call, self.samples - done)
            rep = (lambda t: t.repeat_interleave(m, dim=0)) if m > 1 else (lambda t: t)
            _, count, _ = self.inner(tree, rep(node_ids), rep(node_q), rep(target_probs), rng)
            total += count.reshape(B, m).to(torch.float64).sum(1).cpu()
            done += m
        return total / self.samples

    def _chain(self, tree, node_ids, node_q, target_probs):
        """(sum_i t_i, sum_i w_i) on the first-child path, [B] each; (None, None) if it is no chain draft."""
        if self.children not in CHAIN_MODES:
            return None, None
        path = first_child_path(tree.parents)
        parents = torch.tensor([tree.parents[i] + 1 for i in path], device=node_q.device)  # p's row of each node
        nodes = torch.tensor(path, device=node_q.device)
        ids = node_ids[:, nodes].long()[..., None]  # [B, D, 1]
        dtype = _compute_dtype(node_q, target_probs)
        p_x = torch.gather(target_probs[:, parents], 2, ids)[..., 0].to(dtype)  # [B, D]
        q_x = torch.gather(node_q[:, nodes], 2, ids)[..., 0].to(dtype)
        return (token_wise_weights(p_x, q_x)[:, 1:].sum(1).cpu(), block_weights(p_x, q_x)[:, 1:].sum(1).cpu())

    def summary(self) -> dict:
        """Row-passes, the tree's tokens per pass (expected given its drafts, and realised), the
        first-child chain's expected tokens per pass under token-wise and block verification, and
        the tree's paired gain over each with its standard error (delta method)."""
        rows = self.rows
        n = len(rows)
        out = {"row_passes": n, "samples": self.samples, "children": self.children}
        if not n:
            return out
        tree = [1 + r["expected"] for r in rows]
        out.update(tree_tokens_per_pass=sum(tree) / n,
                   tree_tokens_per_pass_realised=sum(1 + r["realised"] for r in rows) / n,
                   nodes_per_pass=sum(r["nodes"] for r in rows) / n)
        chained = [r for r in rows if r["chain_t"] is not None]
        if chained:
            m = len(chained)
            tree_c = [1 + r["expected"] for r in chained]
            for rule, key in (("token_wise", "chain_t"), ("block", "chain_w")):
                chain = [1 + r[key] for r in chained]
                gain, se = _ratio_and_se(tree_c, chain)
                out[f"chain_{rule}_tokens_per_pass"] = sum(chain) / m
                out[f"gain_over_{rule}_chain"] = gain
                out[f"gain_over_{rule}_chain_se"] = se
            out["chain_depth"] = sum(r["chain_depth"] for r in chained) / m
        return out
