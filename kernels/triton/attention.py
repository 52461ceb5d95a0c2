"""verify_attention in Triton: flash-decoding over a static KV cache.

One program owns one (batch row, KV head, block of query rows, slice of the cache). Its query
rows are all G query heads that share the KV head times the T new tokens (row = g * T + t), so
each K/V tile is read once per group (GQA), and T = 1..16 verify passes read the cache once.
Long caches are cut into ``num_splits`` slices handled by separate programs (more programs
than batch x KV heads alone would give keep the GPU busy at small batch); each slice writes a
normalized partial output and its log-sum-exp, and a second kernel combines the slices.

Scores and softmax are fp32 (base-2 exponentials with log2(e) folded into the scale); P is
cast to the value dtype for the P @ V product, as in flash attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .launch import check_launchable, kernel, positions_on_host

LOG2_E = 1.4426950408889634
MIN_SPLIT_KEYS = 256  # a slice shorter than this costs more to combine than it saves
MAX_SPLITS = 128  # the combine kernel holds all slices of a row in one tile
WAVES = 4  # aim for about this many slice programs per SM (several fit on one SM at once)
INTERPRETER_SM_COUNT = 8  # stand-in for the SM count when no GPU is involved
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@kernel
def _attention_slice(
    q_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, out_ptr, lse_ptr,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sm_b, sm_t, sm_j,
    so_s, so_b, so_h, so_t, so_d,
    sl_s, sl_b, sl_h, sl_t,
    qk_scale, split_len, NUM_SPLITS, S_MAX, H_KV, G, T, D,
    HAS_MASK: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H_KV).to(tl.int64)
    kvh = (pid_bh % H_KV).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)  # slot of this row's first new token

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query row = g * T + t
    row_ok = rows < G * T
    t = rows % T  # [BLOCK_M] token index in the active block
    h = kvh * G + rows // T  # [BLOCK_M] query head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q = tl.load(
        q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + d[None, :] * sq_d,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # cache slots this program reads: its slice, cut at the last slot any of its rows may see.
    # The last slice runs to the row's end, so the result never depends on the host's view of
    # the positions (only the balance between slices does); S_MAX bounds every read.
    lo = pid_s.to(tl.int64) * split_len
    hi = tl.minimum(pos + T, S_MAX)
    hi = tl.where(pid_s + 1 < NUM_SPLITS, tl.minimum(hi, lo + split_len), hi)
    if not HAS_MASK:
        t_last = tl.max(tl.where(row_ok, t, 0), axis=0)
        hi = tl.minimum(hi, pos + t_last + 1)
    last_visible = pos + t  # [BLOCK_M] causal: query t sees slots 0 .. pos + t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache slots
        j_ok = j < hi
        k_t = tl.load(
            k_ptr + b * sk_b + kvh * sk_h + j[None, :] * sk_s + d[:, None] * sk_d,
            mask=d_ok[:, None] & j_ok[None, :], other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if UPCAST_DOT:
            k_t = k_t.to(tl.float32)
        if IEEE_FP32:
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if HAS_MASK:
            rel = j - pos  # [BLOCK_N] slot index inside the active block
            in_active = (rel >= 0) & (rel < T) & j_ok
            tree = tl.load(
                mask_ptr + b * sm_b + t[:, None] * sm_t + rel[None, :] * sm_j,
                mask=row_ok[:, None] & in_active[None, :], other=0,
            )  # [BLOCK_M, BLOCK_N] uint8
            allowed = (j[None, :] < pos) | (tree != 0)
        else:
            allowed = j[None, :] <= last_visible[:, None]
        allowed = allowed & j_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + b * sv_b + kvh * sv_h + j[:, None] * sv_s + d[None, :] * sv_d,
            mask=j_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST_DOT:
            # bf16/fp16 products are exact in fp32: same arithmetic as the GPU's low-precision dot
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        elif IEEE_FP32:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + pid_s * so_s + b * so_b + h[:, None] * so_h + t[:, None] * so_t + d[None, :] * so_d,
        o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
    if WRITE_LSE:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + pid_s * sl_s + b * sl_b + h * sl_h + t * sl_t, lse, mask=row_ok)


@kernel
def _combine_slices(
    part_ptr, lse_ptr, out_ptr,
    sp_s, sl_s,
    so_b, so_h, so_t, so_d,
    H, T, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * T + t; partials are contiguous
    b = row // (H * T)
    h = (row // T) % H
    t = row % T
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse = tl.load(lse_ptr + s * sl_s + row, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty slices weigh 0
    part = tl.load(part_ptr + s[:, None] * sp_s + row * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)  # [BLOCK_D]
    tl.store(out_ptr + b * so_b + h * so_h + t * so_t + d * so_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


def launch_config(G: int, T: int, D: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options of the slice kernel for a shape.

    Chosen so that shared memory stays under 99 KiB (the smallest limit among sm_80+ GPUs;
    checked by compiling every branch in the tests) and the fp32 accumulator fits in
    registers. Not tuned on hardware yet.
    """
    block_d = max(16, triton.next_power_of_2(D))
    fp32 = dtype == torch.float32
    max_m = (64 if fp32 else 128) // (2 if block_d > 128 else 1)
    block_m = min(max_m, max(16, triton.next_power_of_2(G * T)))
    if fp32:  # fp32 tiles are twice the bytes: narrower key blocks, two pipeline stages
        block_n = 32 if block_d <= 128 else 16
    else:
        block_n = 64 if block_m * block_d < 128 * 128 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_m <= 64 else 8,
                num_stages=2 if fp32 else 3)


def combine_config(splits: int, D: int) -> dict:
    block_s, block_d = max(2, triton.next_power_of_2(splits)), max(16, triton.next_power_of_2(D))
    return dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8 if block_s * block_d > 4096 else 4)


def plan_splits(n_programs: int, keys: int, block_n: int, sm_count: int, num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, keys per split): about WAVES programs per SM, no slice under MIN_SPLIT_KEYS,
    at most MAX_SPLITS slices."""
    if num_splits is None:
        wanted = triton.cdiv(WAVES * sm_count, max(n_programs, 1))
        num_splits = max(1, min(wanted, triton.cdiv(keys, MIN_SPLIT_KEYS), MAX_SPLITS))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an integer in 1..{MAX_SPLITS} or None, got {num_splits!r}")
    split_len = triton.cdiv(triton.cdiv(keys, num_splits), block_n) * block_n  # whole key blocks
    return triton.cdiv(keys, split_len), split_len


def verify_attention(
    q: torch.Tensor,  # [B, H, T, D]
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D], already holding the T new tokens
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    positions: torch.Tensor,  # [B] slot of each row's first new token
    scale: float,
    active_mask: torch.Tensor | None = None,  # [B, T, T] bool
    *,
    num_splits: int | None = None,  # None: chosen from the cache length and the GPU size
) -> torch.Tensor:  # [B, H, T, D] in q.dtype
    """Attention of T new queries per row over the prior cache plus the active block (see
    ``verispec.kernels.reference.verify_attention`` for the contract)."""
    interpret = check_launchable("verify_attention", q, k_cache, v_cache, positions, active_mask)
    pos = reference.check_verify_attention_args(q, k_cache, v_cache, positions_on_host(positions), active_mask)
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"triton verify_attention needs q, k_cache and v_cache in one of float16/bfloat16/float32; "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    keys = max(pos) + T  # the most slots any row reads
    out = torch.empty_like(q)  # [B, H, T, D], q's memory layout: the caller's transpose back is then free
    if B == 0 or H == 0 or T == 0 or D == 0:
        return out

    config = launch_config(G, T, D, q.dtype)
    n_m = triton.cdiv(G * T, config["BLOCK_M"])
    splits, split_len = plan_splits(B * H_kv * n_m, keys, config["BLOCK_N"], _sm_count(q.device), num_splits)

    positions = positions.contiguous()
    has_mask = active_mask is not None
    tree = active_mask.view(torch.uint8) if has_mask else positions  # dummy pointer when unused
    sm = tree.stride() if has_mask else (0, 0, 0)
    flags = dict(
        HAS_MASK=has_mask, IEEE_FP32=q.dtype == torch.float32, UPCAST_DOT=interpret and q.dtype != torch.float32, **config
    )
    common = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *sm)
    if splits == 1:
        _attention_slice[(B * H_kv, n_m, 1)](
            q, k_cache, v_cache, positions, tree, out, out,
            *common, 0, *out.stride(), 0, 0, 0, 0,
            float(scale) * LOG2_E, split_len, splits, k_cache.shape[2], H_kv, G, T, D, WRITE_LSE=False, **flags,
        )
        return out
    part = torch.empty(splits, B, H, T, D, dtype=torch.float32, device=q.device)  # normalized per slice
    lse = torch.empty(splits, B, H, T, dtype=torch.float32, device=q.device)  # log2-sum-exp2 per slice
    _attention_slice[(B * H_kv, n_m, splits)](
        q, k_cache, v_cache, positions, tree, part, lse,
        *common, *part.stride(), *lse.stride(),
        float(scale) * LOG2_E, split_len, splits, k_cache.shape[2], H_kv, G, T, D, WRITE_LSE=True, **flags,
    )
    _combine_slices[(B * H * T,)](
        part, lse, out, part.stride(0), lse.stride(0), *out.stride(), H, T, D, splits,
        **combine_config(splits, D),
    )
    return out
