"""kv_append in Triton: scatter T new K/V rows per batch row to slots positions[b] + t.

Out-of-range writes are detected on the host before launch (the positions are fetched once per
tensor, see ``launch.positions_on_host``) and raise ``IndexError``; the kernel also masks every
store to ``0 <= slot < S_max``, so it cannot write outside the cache even if it were launched
with positions that changed after the check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .launch import check_launchable, kernel, positions_on_host

MAX_BLOCK_T = 16  # new tokens per program at most


@kernel
def _kv_append(
    k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, pos_ptr,
    skc_b, skc_h, skc_s, skc_d,
    svc_b, svc_h, svc_s, svc_d,
    skn_b, skn_h, skn_t, skn_d,
    svn_b, svn_h, svn_t, svn_d,
    H_KV, T, D, S_MAX,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(pos_ptr + b).to(tl.int64) + t  # [BLOCK_T]
    ok = ((t < T) & (slot >= 0) & (slot < S_MAX))[:, None] & (d < D)[None, :]  # [BLOCK_T, BLOCK_D]
    k = tl.load(k_new_ptr + b * skn_b + h * skn_h + t[:, None] * skn_t + d[None, :] * skn_d, mask=ok)
    v = tl.load(v_new_ptr + b * svn_b + h * svn_h + t[:, None] * svn_t + d[None, :] * svn_d, mask=ok)
    tl.store(k_cache_ptr + b * skc_b + h * skc_h + slot[:, None] * skc_s + d[None, :] * skc_d, k, mask=ok)
    tl.store(v_cache_ptr + b * svc_b + h * svc_h + slot[:, None] * svc_s + d[None, :] * svc_d, v, mask=ok)


def launch_config(T: int, D: int) -> dict:
    block_t, block_d = min(MAX_BLOCK_T, triton.next_power_of_2(T)), triton.next_power_of_2(D)
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4 if block_t * block_d >= 1024 else 1)


def kv_append(
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    k_new: torch.Tensor,  # [B, H_kv, T, D]
    v_new: torch.Tensor,  # [B, H_kv, T, D]
    positions: torch.Tensor,  # [B] int, first slot written per row
) -> None:
    """Write T new K/V rows per batch row at slots positions[b] .. positions[b]+T-1, in place."""
    check_launchable("kv_append", k_cache, v_cache, k_new, v_new, positions)
    reference.check_kv_append_args(k_cache, v_cache, k_new, v_new, positions_on_host(positions))
    B, H_kv, S_max, D = k_cache.shape
    T = k_new.shape[2]
    if B == 0 or H_kv == 0 or T == 0 or D == 0:
        return
    config = launch_config(T, D)
    _kv_append[(B * H_kv, triton.cdiv(T, config["BLOCK_T"]))](
        k_cache, v_cache, k_new, v_new, positions.contiguous(),
        *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        H_kv, T, D, S_max,
        **config,
    )
