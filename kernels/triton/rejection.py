"""The exact accept/reject step in Triton: one program per batch row.

Same signature and, given the same random numbers, the same decisions as the torch twin
``verispec.spec.rejection.rejection_sample`` (read its docstring for the rule). What makes the
two bit-identical rather than merely close:
  * the ratio test is the twin's fp32 ``uniforms * q(x) < p(x)`` (one rounded multiply, no
    division);
  * "the residual has no positive mass" is tested as ``max(residual) <= 0``, which for
    non-negative values is exactly the twin's ``sum(residual) <= 0`` in any summation order;
  * the race divides with ``div_rn`` (IEEE round-to-nearest; plain ``/`` is an approximate
    division on GPUs) and keeps the lowest id on ties across and within vocabulary blocks,
    like ``torch.argmax``.
The race for the residual and the one for p are run side by side in one pass over the
vocabulary; the row picks one at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_launchable, kernel

BLOCK_V = 1024  # vocabulary entries per loop step


@kernel
def _accept_reject(
    ids_ptr, q_ptr, p_ptr, u_ptr, e_ptr, accepted_ptr, tokens_ptr,
    s_ids_b, s_ids_i,
    s_q_b, s_q_i, s_q_v,
    s_p_b, s_p_i, s_p_v,
    s_u_b, s_u_i,
    s_e_b, s_e_v,
    s_tok_b, s_tok_i,
    G, V,
    BLOCK_G: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # ratio test of every draft at once; accepted = index of the first failure (G if none)
    i = tl.arange(0, BLOCK_G)  # [BLOCK_G] draft index, BLOCK_G >= G + 1
    is_draft = i < G
    x = tl.load(ids_ptr + b * s_ids_b + i * s_ids_i, mask=is_draft, other=0).to(tl.int64)  # [BLOCK_G]
    p_x = tl.load(p_ptr + b * s_p_b + i * s_p_i + x * s_p_v, mask=is_draft, other=0.0)
    q_x = tl.load(q_ptr + b * s_q_b + i * s_q_i + x * s_q_v, mask=is_draft, other=0.0)
    u = tl.load(u_ptr + b * s_u_b + i * s_u_i, mask=is_draft, other=0.0)
    rejected = is_draft & ~(u * q_x < p_x)
    accepted = tl.min(tl.where(rejected, i, G), axis=0)

    # exponential race over the vocabulary for the recovered token (residual) and the bonus
    # or fallback token (p); the target row is the first unaccepted slot
    q_row = tl.maximum(tl.minimum(accepted, G - 1), 0)
    q_len = tl.where(q_row < G, V, 0)  # no q row to read when G = 0
    best_res = tl.full([], float("-inf"), tl.float32)
    best_res_id = tl.full([], 0, tl.int64)
    best_p = tl.full([], float("-inf"), tl.float32)
    best_p_id = tl.full([], 0, tl.int64)
    res_max = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V] token ids
        v_ok = v < V
        p_a = tl.load(p_ptr + b * s_p_b + accepted * s_p_i + v * s_p_v, mask=v_ok, other=0.0)
        q_a = tl.load(q_ptr + b * s_q_b + q_row * s_q_i + v * s_q_v, mask=v < q_len, other=0.0)
        e = tl.load(e_ptr + b * s_e_b + v * s_e_v, mask=v_ok, other=1.0)
        residual = tl.maximum(p_a - q_a, 0.0)
        res_max = tl.maximum(res_max, tl.max(residual, axis=0))
        key_res = tl.where(v_ok, tl.math.div_rn(residual, e), float("-inf"))
        key_p = tl.where(v_ok, tl.math.div_rn(p_a, e), float("-inf"))
        blk_res, blk_res_id = tl.max(key_res, axis=0, return_indices=True, return_indices_tie_break_left=True)
        blk_p, blk_p_id = tl.max(key_p, axis=0, return_indices=True, return_indices_tie_break_left=True)
        take = blk_res > best_res  # strict: an earlier block keeps a tie
        best_res_id = tl.where(take, v0 + blk_res_id.to(tl.int64), best_res_id)
        best_res = tl.where(take, blk_res, best_res)
        take = blk_p > best_p
        best_p_id = tl.where(take, v0 + blk_p_id.to(tl.int64), best_p_id)
        best_p = tl.where(take, blk_p, best_p)
    use_p = (accepted == G) | (res_max <= 0.0)  # bonus token, or a residual without mass
    emitted = tl.where(use_p, best_p_id, best_res_id)

    tokens = tl.where(i < accepted, x, tl.where(i == accepted, emitted, -1))  # [BLOCK_G]
    tl.store(tokens_ptr + b * s_tok_b + i * s_tok_i, tokens, mask=i <= G)
    tl.store(accepted_ptr + b, accepted.to(tl.int64))


def launch_config(g: int, V: int) -> dict:
    # no fused multiply-adds: every rounding must be the twin's (there is no a * b + c here
    # today; this keeps it so if one is added)
    return dict(BLOCK_G=max(2, triton.next_power_of_2(g + 1)), BLOCK_V=min(BLOCK_V, max(16, triton.next_power_of_2(V))),
                num_warps=4, enable_fp_fusion=False)


def _check_args(draft_ids, draft_probs, target_probs, uniforms, exponentials) -> None:
    for name, t in (("draft_ids", draft_ids), ("draft_probs", draft_probs), ("target_probs", target_probs),
                    ("uniforms", uniforms), ("exponentials", exponentials)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if draft_ids.dim() != 2:
        raise ValueError(f"draft_ids must be [B, g], got {tuple(draft_ids.shape)}")
    from ...spec.rejection import check_shapes  # the contract's home; imported late: spec imports the model

    B, g, V = check_shapes(draft_ids, draft_probs, target_probs, uniforms, exponentials)
    if draft_ids.dtype.is_floating_point or draft_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"draft_ids must be an integer tensor, got {draft_ids.dtype}")
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs), ("uniforms", uniforms),
                    ("exponentials", exponentials)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if V == 0:
        raise ValueError("target_probs has an empty vocabulary (V = 0)")


def accept_reject(
    draft_ids: torch.Tensor,  # [B, g] int, g = k - 1 >= 0
    draft_probs: torch.Tensor,  # [B, g, V]: q, what each draft was sampled from
    target_probs: torch.Tensor,  # [B, g + 1, V]: p at each of the k verify positions
    uniforms: torch.Tensor,  # [B, g] in [0, 1): accept-test draws
    exponentials: torch.Tensor,  # [B, V] > 0: Exp(1) race for the recovered/bonus token
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted [B] int64 in 0..g, tokens [B, g + 1] int64
    """Triton twin of ``rejection_sample``: (accepted, tokens), tokens[b, a+1:] = -1.

    Raises ``IndexError`` for a draft id outside 0..V-1 and ``ValueError`` for an exponential
    that is not > 0 (both checked in one device-to-host read).
    """
    _check_args(draft_ids, draft_probs, target_probs, uniforms, exponentials)
    check_launchable("accept_reject", draft_ids, draft_probs, target_probs, uniforms, exponentials)
    B, g = draft_ids.shape
    V = target_probs.shape[-1]
    device = target_probs.device
    accepted = torch.empty(B, dtype=torch.int64, device=device)  # [B]
    tokens = torch.empty(B, g + 1, dtype=torch.int64, device=device)  # [B, g + 1]
    if B == 0:
        return accepted, tokens
    bad_ids = ((draft_ids < 0) | (draft_ids >= V)).any() if g else torch.zeros((), dtype=torch.bool, device=device)
    bad_exp = ~(exponentials > 0).all()  # also catches NaN
    bad_ids, bad_exp = torch.stack([bad_ids, bad_exp]).tolist()
    if bad_ids:
        raise IndexError(f"draft_ids hold a token id outside the vocabulary 0..{V - 1}")
    if bad_exp:
        raise ValueError("exponentials must all be > 0 (Exp(1) draws); got a zero, negative or NaN entry")

    p = target_probs.float()  # [B, g + 1, V] fp32, as the twin computes
    q = draft_probs.float()  # [B, g, V]
    u = uniforms.float()  # [B, g]
    e = exponentials.float()  # [B, V]
    ids = draft_ids
    if g == 0:  # no drafts: give the kernel valid (never read) buffers instead of empty ones
        ids = torch.zeros(B, 1, dtype=torch.int64, device=device)
        q = torch.zeros(B, 1, 1, dtype=torch.float32, device=device)
        u = torch.zeros(B, 1, dtype=torch.float32, device=device)
    _accept_reject[(B,)](
        ids, q, p, u, e, accepted, tokens,
        *ids.stride(), *q.stride(), *p.stride(), *u.stride(), *e.stride(), *tokens.stride(),
        g, V, **launch_config(g, V),
    )
    return accepted, tokens
