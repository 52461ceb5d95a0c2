"""kv_gather for the ``cpu`` backend: move the accepted path of a token tree to contiguous slots.

The move is at most a few rows per batch row (one per accepted node), so it is two advanced-
indexing copies per cache in torch, not native code: every source row of every batch row is read
into a temporary ([M, H_kv, D]) before any destination is written, so sources may overlap
destinations, and the result is exactly the reference's.
"""

from __future__ import annotations

import torch

from .. import reference


def kv_gather(
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    src_slots: torch.Tensor,  # [B, N] int: slot of the i-th accepted node of row b
    dst_start: torch.Tensor,  # [B] int: first slot of row b's contiguous run
    counts: torch.Tensor,  # [B] int in 0..N: entries of src_slots[b] used
) -> None:
    """In place, per row b: slots dst_start[b] + i (i < counts[b]) receive the K/V rows that slots
    src_slots[b, i] held before the call (the reference's checks and errors; nothing is written
    when they raise)."""
    src, start, cnt = reference.check_kv_gather_args(k_cache, v_cache, src_slots, dst_start, counts)
    rows = [b for b, c in enumerate(cnt) for _ in range(c)]  # [M] batch row of each moved row
    if not rows:
        return
    srcs = [s for b, c in enumerate(cnt) for s in src[b][:c]]  # [M]
    dsts = [start[b] + i for b, c in enumerate(cnt) for i in range(c)]  # [M], distinct per batch row
    device = k_cache.device
    b_idx, s_idx, d_idx = (torch.tensor(x, dtype=torch.long, device=device) for x in (rows, srcs, dsts))
    for cache in (k_cache, v_cache):
        moved = cache[b_idx, :, s_idx]  # [M, H_kv, D]: a copy, taken before any write
        cache[b_idx, :, d_idx] = moved
