"""Drafting a token tree, level by level, with one draft forward per level.

The tree's nodes sit at the draft's cache slots n + i (n = the row's committed length, so the last
committed token is at n - 1), at RoPE position n - 1 + depth, each attending to the prefix and to
its ancestors (the ``active_mask`` of the nodes fed). A forward's active block starts at slot n:
the kernels' mask covers only the tokens of one forward, so each level feeds every node expanded
so far (their K/V are rewritten with the same values) with the mask among them, and reads the
logits at the nodes whose children it draws next. The deepest nodes are never fed.

``fed[b, i]``: the slot offset (from n) where node i's K/V lie in the draft's cache after drafting,
-1 if it was never fed; the nodes fed are ancestor-closed, so an accepted path's fed nodes are a
prefix of it, which ``kv_gather`` moves to slots n, n + 1, .. (:func:`compact_path`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..model.sampling import SamplingParams, greedy_ids, logits_to_probs
from .tree import DynamicTree, TreeSpec
from .tree_children import draw_children, top_ids

# level(ids [B, M], offsets [B, M] (RoPE position - n), mask [B, M, M], logits_at [B, m]) -> logits [B, m, V]
LevelForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TreeProposal(NamedTuple):
    trees: list  # [B] TreeSpec per row (one object shared by the rows of a static tree)
    node_ids: torch.Tensor  # [B, N] int64
    node_q: torch.Tensor  # [B, N, V] fp32: the law node i's token was drawn from
    fed: torch.Tensor  # [B, N] int64: the draft cache slot offset of node i's K/V, -1: not fed


def children_of(logits: torch.Tensor, b: int, children: str, params: SamplingParams, gen: torch.Generator,
                who: str, argmax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] draft logits at the parents -> (drawn [R, b], laws [R, b, V]). At temperature 0 every
    mode takes the b likeliest tokens (one-hot laws): the decisions there read the target's argmax
    alone, and b copies of the one argmax would waste b - 1 nodes."""
    if params.greedy:
        if b == 1:
            drawn = greedy_ids(logits, who, argmax)[:, None]
        else:
            drawn = top_ids(logits.float(), b)
        return drawn, F.one_hot(drawn, logits.shape[-1]).float()
    return draw_children(logits_to_probs(logits, params, who), b, children, gen)


def draft_static(level: LevelForward, root_logits: torch.Tensor, tree: TreeSpec, children: str,
                 params: SamplingParams, gen: torch.Generator, who: str, argmax=None,
                 sync=lambda t: t) -> TreeProposal:
    """The same topology for every row: level d's children drawn from the logits at level d - 1."""
    B, V = root_logits.shape
    N, depth = tree.n_nodes, tree.depth
    ids = torch.zeros(B, N, dtype=torch.long)
    node_q = torch.zeros(B, N, V, dtype=torch.float32)
    mask = tree.ancestors_mask()
    offsets = tree.position_offsets()
    logits, parents = root_logits[:, None], [-1]  # [B, m, V] at the parents whose children come next
    end = fed_end = 0  # nodes drawn so far (the levels before are complete); nodes fed
    for d in range(1, tree.max_depth + 1):
        for j, u in enumerate(parents):
            ch = tree.children(u)
            drawn, laws = children_of(logits[:, j], len(ch), children, params, gen, who, argmax)
            ids[:, ch[0]:ch[-1] + 1] = sync(drawn.cpu())
            node_q[:, ch[0]:ch[-1] + 1] = laws.to(node_q.device)
        start, end = end, sum(1 for x in depth if x <= d)
        parents = [u for u in range(start, end) if tree.children(u)]
        if not parents:
            break
        at = torch.tensor(parents, dtype=torch.long)[None].expand(B, -1)
        logits = level(ids[:, :end], offsets[:end][None].expand(B, -1), mask[:end, :end][None].expand(B, -1, -1), at)
        fed_end = end
    fed = torch.where(torch.arange(N) < fed_end, torch.arange(N), -1)
    return TreeProposal([tree] * B, ids, node_q, fed[None].expand(B, -1).clone())


def draft_dynamic(level: LevelForward, root_logits: torch.Tensor, spec: DynamicTree, params: SamplingParams,
                  who: str, argmax=None, sync=lambda t: t) -> TreeProposal:
    """EAGLE-2's growth with deterministic children: each level expands the ``width`` likeliest
    candidates of the last level (value: the product of q along the path) into their ``width``
    likeliest children; the ``n_nodes`` likeliest candidates of all levels form each row's tree
    (a child's value never exceeds its parent's, and ties keep the parent, so the set holds its
    ancestors). Siblings are one-hot "top" children of the draft's law after the sampling
    parameters (at temperature 0, of its logits)."""
    B, V = root_logits.shape
    w = min(spec.width, V)
    # candidate c of row b: token, parent candidate (-1: root), value (log path probability), level
    tok: list[torch.Tensor] = []  # per level [B, m] int64
    par: list[torch.Tensor] = []  # per level [B, m] int64 (global candidate index)
    val: list[torch.Tensor] = []  # per level [B, m] fp64
    expanded: list[torch.Tensor] = []  # per level >= 1 [B, w] global candidate indices fed
    logits = root_logits[:, None]  # [B, 1, V]
    parent_val = torch.zeros(B, 1, dtype=torch.float64)
    parent_idx = torch.full((B, 1), -1, dtype=torch.long)
    count = 0
    for d in range(1, spec.max_depth + 1):
        m = logits.shape[1]
        flat = logits.reshape(B * m, V)
        logp = (logits_to_probs(flat, params, who).double().clamp_min(1e-300).log() if not params.greedy
                else torch.log_softmax(flat.double(), -1))
        order = top_ids(logp, w)
        t = sync(order.reshape(B, m * w).cpu())
        v = (parent_val[:, :, None] + logp.gather(1, order).reshape(B, m, w).cpu()).reshape(B, m * w)
        tok.append(t)
        par.append(parent_idx[:, :, None].expand(B, m, w).reshape(B, m * w))
        val.append(v)
        first = count
        count += m * w
        if d == spec.max_depth:
            break
        # expand the w likeliest of this level (stable: earlier candidates first on ties)
        pick = torch.sort(v, dim=-1, descending=True, stable=True).indices[:, :w]  # [B, w] level-local
        expanded.append(first + pick)
        parent_idx, parent_val = first + pick, v.gather(1, pick)
        logits = _feed_expanded(level, tok, par, expanded, B)
    tokens, parents, values = torch.cat(tok, 1), torch.cat(par, 1), torch.cat(val, 1)  # [B, C]
    C = tokens.shape[1]
    N = min(spec.n_nodes, C)
    levels = torch.cat([torch.full((B, x.shape[1]), i + 1) for i, x in enumerate(tok)], 1)  # [B, C]
    # the N best by value; ties: shallower, then earlier candidates (so a parent beats its child)
    key = torch.stack([-values, levels.double(), torch.arange(C).double().expand(B, -1)], -1)
    chosen = [sorted(range(C), key=lambda c: tuple(key[b, c].tolist()))[:N] for b in range(B)]
    fed_set = [set(torch.cat(expanded, 1)[b].tolist()) if expanded else set() for b in range(B)]
    trees, ids = [], torch.zeros(B, N, dtype=torch.long)
    fed = torch.full((B, N), -1, dtype=torch.long)
    feed_order = _feed_order(expanded, B)
    for b in range(B):
        # breadth-first: level by level, a level's nodes grouped by their parent's place in the tree
        keep, where = [], {}
        for lv in range(1, len(tok) + 1):
            here = [c for c in chosen[b] if int(levels[b, c]) == lv]
            here.sort(key=lambda c: (-1 if int(parents[b, c]) < 0 else where[int(parents[b, c])], c))
            for c in here:
                where[c] = len(keep)
                keep.append(c)
        tree_parents = [-1 if int(parents[b, c]) < 0 else where[int(parents[b, c])] for c in keep]
        trees.append(TreeSpec(tuple(tree_parents)))
        ids[b] = tokens[b, keep]
        for i, c in enumerate(keep):
            if c in fed_set[b]:
                fed[b, i] = feed_order[b][c]
    node_q = F.one_hot(ids, V).float()
    return TreeProposal(trees, ids, node_q, fed)


def _feed_order(expanded: list, B: int) -> list[dict]:
    """Row b: candidate -> its slot offset in the last feed (the expanded candidates, level order)."""
    if not expanded:
        return [{} for _ in range(B)]
    allx = torch.cat(expanded, 1)  # [B, F]
    return [{int(c): i for i, c in enumerate(allx[b].tolist())} for b in range(B)]


def _feed_expanded(level: LevelForward, tok, par, expanded, B: int) -> torch.Tensor:
    """Feed every expanded candidate so far (level order) with its ancestors mask -> logits [B, w, V]
    at the ones expanded last."""
    allx = torch.cat(expanded, 1)  # [B, F] global candidate ids
    F_ = allx.shape[1]
    tokens, parents = torch.cat(tok, 1), torch.cat(par, 1)
    levels = torch.cat([torch.full((B, x.shape[1]), i) for i, x in enumerate(tok)], 1)  # depth - 1
    ids = tokens.gather(1, allx)
    offsets = levels.gather(1, allx)
    mask = torch.zeros(B, F_, F_, dtype=torch.bool)
    for b in range(B):
        pos = {int(c): i for i, c in enumerate(allx[b].tolist())}
        for i, c in enumerate(allx[b].tolist()):
            mask[b, i, i] = True
            p = int(parents[b, c])
            if p >= 0:
                mask[b, i] |= mask[b, pos[p]]  # parents are fed before their children
    w = expanded[-1].shape[1]
    at = torch.arange(F_ - w, F_)[None].expand(B, -1)
    return level(ids, offsets, mask, at)


def compact_path(path: torch.Tensor, count: torch.Tensor, fed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """path [B, D] node indices (-1 padded), count [B], fed [B, N] -> (src [B, D] slot offsets of the
    path's fed prefix, 0 padded; its length [B])."""
    B, D = path.shape
    if D == 0:
        return torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    slot = fed.gather(1, path.clamp(min=0))  # [B, D]
    ok = (torch.arange(D)[None] < count[:, None]) & (slot >= 0)
    n = ok.long().cumprod(1).sum(1)  # the fed prefix
    return torch.where(ok, slot, 0), n
