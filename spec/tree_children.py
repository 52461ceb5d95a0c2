"""Drawing a token tree's siblings from the draft's law q at their parent (``children=``):
i.i.d. ("sample"), without replacement ("distinct") or the likeliest ("top"), each with the law it
was drawn from (``node_q``), which the tree acceptors' exactness rests on; and :func:`top_ids`,
the b likeliest ids without sorting the vocabulary."""

from __future__ import annotations

import torch

from .tree import CHILDREN_MODES


def top_ids(x: torch.Tensor, b: int) -> torch.Tensor:
    """[R, V] -> [R, min(b, V)] int64: the first b ids of a stable descending sort of each row (the b
    largest values, ties to the lower id), without sorting all V values: ``topk``, then a stable sort
    of the whole row only where values tied with the b-th one lie outside the b taken (or NaN)."""
    R, V = x.shape
    b = min(b, V)
    vals, idx = torch.topk(x, b, dim=-1)  # [R, b]
    clean = ((x >= vals[:, -1:]).sum(-1) == b) & ~x.isnan().any(-1)  # the b largest are one set, whatever the ties
    ids, perm = idx.sort(-1)  # ids ascending, then values descending, stably: ties to the lower id
    out = ids.gather(1, torch.sort(vals.gather(1, perm), dim=-1, descending=True, stable=True).indices)
    if not bool(clean.all()):
        bad = (~clean).nonzero()[:, 0]
        out[bad] = torch.sort(x[bad], dim=-1, descending=True, stable=True).indices[:, :b]
    return out


def draw_children(q: torch.Tensor,  # [R, V] the draft's law at the parents' contexts
                  b: int, children: str, gen: torch.Generator, exhausted: str = "top",
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # drawn [R, b] int64, laws [R, b, V] fp32
    """b siblings per row and the law each was drawn from (``node_q``):

    - "sample": i.i.d. from q (inverse CDF on uniforms from ``gen``); every law is q.
    - "distinct": without replacement: sibling j is drawn (inverse CDF on a uniform from ``gen``)
      from its law, q with the earlier siblings' tokens removed, renormalised (the law of
      Gumbel-top-b, at a few vocabulary-sized passes a sibling instead of an exponential race).
      Where q has fewer than b possible tokens, ``exhausted="top"`` makes each later sibling the
      likeliest token not yet drawn, with a one-hot law (still honest, so still exact: each sibling
      is one speculative-sampling stage); ``"raise"`` refuses.
    - "top": the b likeliest under q (ties: lowest id), one-hot laws (deterministic given q).
    """
    if children not in CHILDREN_MODES:
        raise ValueError(f"children must be one of {CHILDREN_MODES}, got {children!r}")
    R, V = q.shape
    q = q.float()
    if children == "sample":
        drawn = _inverse_cdf(q, torch.rand(R, b, generator=gen, dtype=torch.float64).to(q.device))
        return drawn, q[:, None].expand(R, b, V).contiguous()
    if children == "top":
        drawn = top_ids(q, b)
        return drawn, torch.nn.functional.one_hot(drawn, V).float()
    possible = (q > 0).sum(-1)  # [R]
    if exhausted == "raise" and bool((possible < b).any()):
        raise ValueError(f"children='distinct': q has fewer than {b} possible tokens at a parent's context")
    drawn = torch.zeros(R, b, dtype=torch.long, device=q.device)
    laws = torch.zeros(R, b, V, dtype=torch.float32, device=q.device)
    used = torch.zeros(R, V, dtype=torch.bool, device=q.device)
    rows = torch.arange(R, device=q.device)
    for j in range(b):  # sibling j from q without the tokens drawn before it, renormalised
        left = q.masked_fill(used, 0.0)
        mass = left.sum(-1, keepdim=True)
        live = mass[:, 0] > 0
        law = left / mass.clamp_min(1e-30)
        pick = _inverse_cdf(law, torch.rand(R, 1, generator=gen, dtype=torch.float64).to(q.device))[:, 0]
        if not bool(live.all()):  # support exhausted: the likeliest token not yet drawn (ties: lowest id), one-hot
            pick = torch.where(live, pick, top_ids(q.masked_fill(used, -1.0), 1)[:, 0])
            law = torch.where(live[:, None], law, torch.nn.functional.one_hot(pick, V).float())
        drawn[:, j], laws[:, j] = pick, law
        used[rows, pick] = True
    return drawn, laws


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R, V] weights, [R, n] uniforms in [0, 1) -> [R, n] ids drawn from p / sum(p) by inverse CDF
    (fp64 cumulative sums); a uniform that rounding carries past the last id with weight takes it."""
    V = p.shape[-1]
    cdf = p.double().cumsum(-1)  # [R, V]
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=V - 1)
    last = (p > 0).long().cumsum(-1).argmax(-1, keepdim=True)  # the last id with weight
    return torch.where(p.gather(1, drawn) > 0, drawn, last.expand_as(drawn))
