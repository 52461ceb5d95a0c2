"""The exact rejection-sampling step (Leviathan et al. 2023; Chen et al. 2023) as a pure
function of explicit random numbers: the torch twin that every fast accept/reject kernel
(e.g. the Triton one) must match decision for decision.

Names follow the papers: ``target_probs`` = p, ``draft_probs`` = q.

For each row b, with g = k - 1 drafts x_0..x_{g-1} sampled from q:
  * draft i is accepted iff ``uniforms[b, i] * q_i(x_i) < p_i(x_i)`` (fp32 multiply and
    compare), i.e. with probability min(1, p/q); the first rejection stops the row.
    q_i(x_i) = 0 (the draft sampled an impossible token) accepts iff p_i(x_i) > 0.
  * on a rejection at i: one "recovered" token from normalize(max(0, p_i - q_i)); when that
    residual has no positive mass (p = q up to rounding), from p_i itself.
  * if all g are accepted: one "bonus" token from p_g.
  * that one token is drawn by an exponential race on an independent stream:
    ``argmax_v r_v / exponentials[b, v]`` (fp32 division; lowest id on ties), which picks v
    with probability r_v / sum(r).
"""

from __future__ import annotations

import torch


def check_shapes(draft_ids, draft_probs, target_probs, uniforms, exponentials) -> tuple[int, int, int]:
    """Check the accept/reject contract's shapes (shared by every backend's kernel); return (B, g, V)."""
    B, g = draft_ids.shape
    V = target_probs.shape[-1]
    if draft_probs.shape != (B, g, V) or target_probs.shape != (B, g + 1, V):
        raise ValueError(
            f"shape mismatch: draft_ids {tuple(draft_ids.shape)}, draft_probs {tuple(draft_probs.shape)}, "
            f"target_probs {tuple(target_probs.shape)} (expected [B, g], [B, g, V], [B, g+1, V])"
        )
    if uniforms.shape != (B, g) or exponentials.shape != (B, V):
        raise ValueError(f"uniforms must be [B, g] and exponentials [B, V]; got {tuple(uniforms.shape)}, {tuple(exponentials.shape)}")
    return B, g, V


def rejection_sample(
    draft_ids: torch.Tensor,  # [B, g] int64, g = k - 1 >= 0
    draft_probs: torch.Tensor,  # [B, g, V] fp32: q, what each draft was sampled from
    target_probs: torch.Tensor,  # [B, g + 1, V] fp32: p at each of the k verify positions
    uniforms: torch.Tensor,  # [B, g] fp32 in [0, 1): accept-test draws
    exponentials: torch.Tensor,  # [B, V] fp32 > 0: Exp(1) race for the recovered/bonus token
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted [B] int64 in 0..g, tokens [B, g + 1] int64
    """Return (accepted, tokens): tokens[b, :a] are the accepted drafts, tokens[b, a] the
    recovered or bonus token, tokens[b, a+1:] = -1 (a = accepted[b])."""
    B, g, V = check_shapes(draft_ids, draft_probs, target_probs, uniforms, exponentials)
    p = target_probs.float()
    q = draft_probs.float()
    idx = draft_ids.long()[..., None]  # [B, g, 1]
    p_x = torch.gather(p[:, :g], 2, idx)[..., 0]  # [B, g]
    q_x = torch.gather(q, 2, idx)[..., 0]  # [B, g]
    ok = uniforms.float() * q_x < p_x  # [B, g]
    # accepted = length of the all-True prefix
    accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1) if g else torch.zeros(B, dtype=torch.long, device=p.device)
    rows = torch.arange(B, device=p.device)
    p_a = p[rows, accepted]  # [B, V] target distribution at the first unaccepted slot
    if g:
        q_a = q[rows, accepted.clamp(max=g - 1)]  # [B, V]
        residual = torch.clamp(p_a - q_a, min=0.0)
        bonus = accepted == g
        empty = residual.sum(-1) <= 0  # p = q up to rounding: fall back to p
        r = torch.where((bonus | empty)[:, None], p_a, residual)
    else:
        r = p_a
    emitted = torch.argmax(r / exponentials.float(), dim=-1)  # [B]; argmax takes the lowest id on ties
    tokens = torch.full((B, g + 1), -1, dtype=torch.long, device=p.device)
    if g:
        keep = torch.arange(g, device=p.device)[None] < accepted[:, None]  # [B, g]
        tokens[:, :g] = torch.where(keep, draft_ids.long(), tokens[:, :g])
    tokens[rows, accepted] = emitted
    return accepted, tokens
