"""kv_gather in Triton: after a token tree is verified, move the accepted path's K/V rows to
contiguous cache slots (per batch row b, slot dst_start[b] + i receives the old rows of slot
src_slots[b, i], i < counts[b]).

Two launches of one copy kernel: the first gathers every source row into a temporary
[B, H_kv, N, D] buffer, the second scatters the buffer to the destinations, so a source that is
also a destination is read before it is overwritten (no ordering between programs, or between
the threads of one program, is needed). Out-of-range slots and counts are detected on the host
before the first launch (``reference.check_kv_gather_args``) and raise without writing; the
kernel also masks every access to ``0 <= slot < S``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .launch import check_launchable, kernel

MAX_BLOCK_N = 16  # moved rows per program at most


@kernel
def _kv_move_rows(
    k_src_ptr, v_src_ptr, k_dst_ptr, v_dst_ptr, src_slot_ptr, dst_slot_ptr, counts_ptr,
    sks_b, sks_h, sks_s, sks_d,
    svs_b, svs_h, svs_s, svs_d,
    skd_b, skd_h, skd_s, skd_d,
    svd_b, svd_h, svd_s, svd_d,
    sss_b, sss_n, sds_b, sds_n,
    H_KV, D, S_SRC, S_DST,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dst[b, h, dst_slot[b, i]] = src[b, h, src_slot[b, i]] for i < counts[b], K and V."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    d = tl.arange(0, BLOCK_D)
    use = i < tl.load(counts_ptr + b)
    src = tl.load(src_slot_ptr + b * sss_b + i * sss_n, mask=use, other=0).to(tl.int64)  # [BLOCK_N]
    dst = tl.load(dst_slot_ptr + b * sds_b + i * sds_n, mask=use, other=0).to(tl.int64)
    use = use & (src >= 0) & (src < S_SRC) & (dst >= 0) & (dst < S_DST)
    ok = use[:, None] & (d < D)[None, :]  # [BLOCK_N, BLOCK_D]
    k = tl.load(k_src_ptr + b * sks_b + h * sks_h + src[:, None] * sks_s + d[None, :] * sks_d, mask=ok)
    v = tl.load(v_src_ptr + b * svs_b + h * svs_h + src[:, None] * svs_s + d[None, :] * svs_d, mask=ok)
    tl.store(k_dst_ptr + b * skd_b + h * skd_h + dst[:, None] * skd_s + d[None, :] * skd_d, k, mask=ok)
    tl.store(v_dst_ptr + b * svd_b + h * svd_h + dst[:, None] * svd_s + d[None, :] * svd_d, v, mask=ok)


def launch_config(N: int, D: int) -> dict:
    block_n, block_d = min(MAX_BLOCK_N, triton.next_power_of_2(N)), triton.next_power_of_2(D)
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_n * block_d >= 1024 else 1)


def _move(k_src, v_src, k_dst, v_dst, src_slots, dst_slots, counts, config) -> None:
    B, H_kv, _, D = k_dst.shape
    N = src_slots.shape[1]
    _kv_move_rows[(B * H_kv, triton.cdiv(N, config["BLOCK_N"]))](
        k_src, v_src, k_dst, v_dst, src_slots, dst_slots, counts,
        *k_src.stride(), *v_src.stride(), *k_dst.stride(), *v_dst.stride(),
        *src_slots.stride(), *dst_slots.stride(),
        H_kv, D, k_src.shape[2], k_dst.shape[2],
        **config,
    )


def kv_gather(
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    src_slots: torch.Tensor,  # [B, N] int: slot of the i-th accepted node of row b
    dst_start: torch.Tensor,  # [B] int: first slot of row b's contiguous run
    counts: torch.Tensor,  # [B] int in 0..N: entries of src_slots[b] used
) -> None:
    """In place, per row b: slots dst_start[b] + i (i < counts[b]) receive the K/V rows that slots
    src_slots[b, i] held before the call (sources may overlap destinations)."""
    check_launchable("kv_gather", k_cache, v_cache, src_slots, dst_start, counts)
    _, _, cnt = reference.check_kv_gather_args(k_cache, v_cache, src_slots, dst_start, counts)
    B, H_kv, _, D = k_cache.shape
    N = src_slots.shape[1]
    if H_kv == 0 or D == 0 or not any(cnt):
        return
    config = launch_config(N, D)
    staged = torch.empty((2, B, H_kv, N, D), dtype=k_cache.dtype, device=k_cache.device)  # K, V
    entries = torch.arange(N, device=k_cache.device).expand(B, N)  # [B, N]: entry i of row b is slot i of staged
    dst_slots = dst_start.to(torch.int64)[:, None] + entries  # [B, N]
    counts = counts.contiguous()
    _move(k_cache, v_cache, staged[0], staged[1], src_slots, entries, counts, config)  # every source is read ...
    _move(staged[0], staged[1], k_cache, v_cache, entries, dst_slots, counts, config)  # ... before any write
