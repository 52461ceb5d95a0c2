"""Per-run statistics of the speculative loop, and the Leviathan speedup formula.

Counts are per row and per verify pass ("row-pass": one row in one batched step):
* acceptance rate      = accepted drafts / proposed drafts
* mean tokens per pass = (accepted drafts + one recovered/bonus token per row-pass) / row-passes
* position acceptance  = P(draft i accepted | drafts before it accepted), i = 1..g
* accepted histogram   = row-passes that kept 0, 1, ..., g drafts
Token trees (``tree=``): mean tokens per pass is the block efficiency; the histogram is of accepted
depths and position acceptance is per depth; also nodes per pass, and rank acceptance [d][r] =
P(sibling r at depth d + 1 accepted | its parent reached, siblings before it rejected).

Costs are measured in the run: ``decode_step_s`` is a one-token target forward at the batch
of the first step (see SpeculativeGenerator), c = draft seconds per drafted position /
decode_step_s, r = verify-pass seconds / decode_step_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def predicted_speedup(a: float, k: int, c: float, r: float) -> float:
    """Leviathan et al.: expected tokens per pass (1 - a^k)/(1 - a) over the pass cost c(k-1) + r
    (in target decode steps). a = 1 takes the limit k."""
    tokens = float(k) if a >= 1.0 else (1.0 - a**k) / (1.0 - a)
    return tokens / (c * (k - 1) + r)


@dataclass
class SpecStats:
    acceptor: str = ""
    lossless: bool | None = None
    draft: str = ""
    rows: int = 0
    new_tokens: int = 0  # tokens committed after the prompts, all rows
    steps: int = 0  # batched verify passes
    row_passes: int = 0
    proposed_drafts: int = 0
    accepted_drafts: int = 0
    k_counts: dict = field(default_factory=dict)  # k -> steps that used it
    target_s_by_k: dict = field(default_factory=dict)  # k -> verify seconds summed over its steps
    reached: list = field(default_factory=list)  # [i] row-passes where draft i+1 was judged
    kept: list = field(default_factory=list)  # [i] row-passes where draft i+1 was accepted
    histogram: list = field(default_factory=list)  # [a] row-passes that accepted a drafts
    prefill_s: float = 0.0
    draft_s: float = 0.0
    target_s: float = 0.0
    accept_s: float = 0.0
    decode_s: float = 0.0  # whole loop after prefill (draft + target + accept + bookkeeping)
    drafted_positions: int = 0  # sum over steps of g (draft cost unit)
    decode_step_s: float | None = None  # measured one-token target forward
    calibration_s: float = 0.0  # k-policy timing its verify costs (not in decode_s, like the decode probe)
    policy: str = ""
    tree: str = ""  # the tree shape of tree passes ("" for chains)
    tree_passes: int = 0  # row-passes that verified a tree
    tree_nodes: int = 0  # nodes verified, summed over those row-passes
    rank_tried: list = field(default_factory=list)  # [d][r] row-passes where sibling r at depth d + 1 was judged
    rank_kept: list = field(default_factory=list)  # [d][r] ... and accepted
    shape_counts: dict = field(default_factory=dict)  # tree shape (str) -> steps that verified it

    def record(self, k: int, accepted: torch.Tensor) -> None:
        """One batched verify pass with g = k - 1 drafts per row; accepted [B] in 0..g."""
        g = k - 1
        B = accepted.shape[0]
        self.steps += 1
        self.row_passes += B
        self.k_counts[k] = self.k_counts.get(k, 0) + 1
        self.proposed_drafts += B * g
        self.accepted_drafts += int(accepted.sum())
        self.drafted_positions += g
        if g == 0:  # no drafts (k = 1): every row-pass accepted none
            if not self.histogram:
                self.histogram.append(0)
            self.histogram[0] += B
            return
        for lst in (self.reached, self.kept):
            lst.extend([0] * (g - len(lst)))
        self.histogram.extend([0] * (g + 1 - len(self.histogram)))
        counts = torch.bincount(accepted.cpu(), minlength=g + 1).tolist()  # [g + 1]
        at_least = [0] * (g + 2)  # at_least[a]: row-passes that accepted >= a drafts
        for a in range(g, -1, -1):
            self.histogram[a] += counts[a]
            at_least[a] = at_least[a + 1] + counts[a]
        for i in range(g):  # draft i+1 is judged when i were accepted, and kept when i+1 were
            self.reached[i] += at_least[i]
            self.kept[i] += at_least[i + 1]

    # ---- derived figures ------------------------------------------------------------------------

    def record_tree(self, trees: list, path: torch.Tensor, count: torch.Tensor) -> None:
        """One tree pass: per row its tree, accepted path [B, D] and length [B]. Siblings are
        counted as tried in order (multi-step and recursive rejection sampling try them so): the
        accepted node's earlier siblings were judged and rejected, and all children of the path's
        last node were judged when the path stopped before a leaf."""
        from .tree_step import groups

        name = str(trees[0])
        self.shape_counts[name] = self.shape_counts.get(name, 0) + 1
        for tree, rows in groups(trees):
            p, c = path[rows].long().cpu(), count[rows].long().cpu()
            self.tree_passes += len(rows)
            self.tree_nodes += tree.n_nodes * len(rows)
            n_children = torch.tensor([len(tree.children(u)) for u in range(-1, tree.n_nodes)])  # [N + 1]
            rank = torch.zeros(tree.n_nodes + 1, dtype=torch.long)  # [node + 1]: place among its siblings
            for u in range(-1, tree.n_nodes):
                for j, ch in enumerate(tree.children(u)):
                    rank[ch + 1] = j
            at = torch.cat([torch.full((len(rows), 1), -1), p], 1)  # [r, D + 1]: the context at each depth
            for d in range(tree.max_depth):
                here = c >= d  # the path reached depth d (its node at depth d is at[:, d])
                b = n_children[at[:, d].clamp(min=-1) + 1]  # children of the context
                judged = here & (b > 0)
                kept = judged & (c > d)
                last = torch.where(kept, rank[p[:, d].clamp(min=0) + 1], b - 1)  # the last rank judged
                if not bool(judged.any()):
                    continue
                width = int(b[judged].max())
                while len(self.rank_tried) <= d:
                    self.rank_tried.append([])
                    self.rank_kept.append([])
                for lst in (self.rank_tried[d], self.rank_kept[d]):
                    lst.extend([0] * (width - len(lst)))
                for r in range(width):
                    self.rank_tried[d][r] += int((judged & (last >= r)).sum())
                    self.rank_kept[d][r] += int((kept & (last == r)).sum())

    @property
    def nodes_per_pass(self) -> float | None:
        return self.tree_nodes / self.tree_passes if self.tree_passes else None

    @property
    def rank_acceptance(self) -> list:
        """[d][r]: P(sibling r at depth d + 1 accepted | its parent reached and siblings < r rejected)."""
        return [[k / t if t else None for k, t in zip(kept, tried)] for kept, tried in zip(self.rank_kept, self.rank_tried)]

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_drafts / self.proposed_drafts if self.proposed_drafts else None

    @property
    def mean_tokens_per_pass(self) -> float | None:
        return (self.accepted_drafts + self.row_passes) / self.row_passes if self.row_passes else None

    @property
    def position_acceptance(self) -> list:
        return [k / r if r else None for k, r in zip(self.kept, self.reached)]

    @property
    def typical_k(self) -> int | None:
        return max(self.k_counts, key=self.k_counts.get) if self.k_counts else None

    @property
    def cost_ratios(self) -> tuple[float | None, float | None]:
        """(c, r): draft step and verify pass, each in units of one target decode step."""
        if not self.decode_step_s or not self.steps:
            return None, None
        c = self.draft_s / self.drafted_positions / self.decode_step_s if self.drafted_positions else 0.0
        return c, self.target_s / self.steps / self.decode_step_s

    @property
    def predicted_speedup(self) -> float | None:
        c, r = self.cost_ratios
        a, k = self.acceptance_rate, self.typical_k
        if r is None or k is None:
            return None
        return predicted_speedup(a if a is not None else 0.0, k, c, r)

    @property
    def measured_speedup(self) -> float | None:
        """Per-row tokens per second against one-token target decoding at the same batch:
        mean tokens per pass x decode_step_s / mean step time."""
        if not self.decode_step_s or not self.steps:
            return None
        return self.mean_tokens_per_pass * self.decode_step_s / (self.decode_s / self.steps)

    def __getitem__(self, key: str):
        """Dict-style access to :meth:`to_dict` (as ``LlamaForSampling.last_stats``)."""
        return self.to_dict()[key]

    def to_dict(self) -> dict:
        c, r = self.cost_ratios
        return {
            "acceptor": self.acceptor,
            "lossless": self.lossless,
            "draft": self.draft,
            "rows": self.rows,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "row_passes": self.row_passes,
            "k_counts": dict(self.k_counts),
            "target_s_by_k": dict(self.target_s_by_k),
            "proposed_drafts": self.proposed_drafts,
            "accepted_drafts": self.accepted_drafts,
            "acceptance_rate": self.acceptance_rate,
            "mean_tokens_per_pass": self.mean_tokens_per_pass,
            "position_acceptance": self.position_acceptance,
            "accepted_histogram": list(self.histogram),
            "tokens_per_s": self.new_tokens / self.decode_s if self.decode_s else None,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "draft_s": self.draft_s,
            "target_s": self.target_s,
            "accept_s": self.accept_s,
            "decode_step_s": self.decode_step_s,
            "calibration_s": self.calibration_s,
            "policy": self.policy,
            "c": c,
            "r": r,
            "predicted_speedup": self.predicted_speedup,
            "measured_speedup": self.measured_speedup,
            "tree": self.tree,
            "nodes_per_pass": self.nodes_per_pass,
            "shape_counts": dict(self.shape_counts),
            "rank_acceptance": self.rank_acceptance,
        }
