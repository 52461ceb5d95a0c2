"""NKI kernel: after a token tree is verified, move the accepted path's K/V rows to contiguous
cache slots.

Per batch row b, entry i < counts[b] of ``src_slots[b]`` names the slot of the i-th accepted
node; slot ``dst_start[b] + i`` receives that slot's K and V rows (every head). Everything is a
runtime value, so one compiled kernel serves every tree:

* the trip count ``counts[b]`` is loaded into a register and bounds two ``nl.fori_loop`` loops
  (unused entries of ``src_slots`` are never read);
* each source slot is DMA'd from ``src_slots`` into a [1, 1] SBUF tile and used as the
  ``scalar_offset`` of an access pattern along the cache's slot axis (as ``kv_append`` does), so
  an out-of-range slot is a DMA bounds error (``oob_mode.error``) on that axis, never a spill
  into the next head's rows;
* all sources are first gathered into SBUF ([H_kv, N, D] per cache, the KV head on the
  partitions), then scattered: a source that is also a destination is read before it is
  overwritten.
"""

from __future__ import annotations

from ._nki import nki, nisa, nl


@nki.jit
def kv_gather_kernel(k_cache, v_cache, src_slots, dst_start, counts):
    """k_cache, v_cache [B, H_kv, S_max, D] (written in place); src_slots [B, N] int32;
    dst_start [B] int32; counts [B] int32 in 0..N."""
    for b in range(k_cache.shape[0]):
        _move_rows(k_cache, v_cache, src_slots, dst_start, counts, b)


def _move_rows(k_cache, v_cache, src_slots, dst_start, counts, b):
    """Batch row b: cache[b, :, dst_start[b] + i, :] = old cache[b, :, src_slots[b, i], :], i < counts[b]."""
    _, H_kv, S_max, D = k_cache.shape
    N = src_slots.shape[1]
    n = nisa.register_alloc()  # counts[b]: the trip count of both loops
    nisa.register_load(n, counts.ap(pattern=[[1, 1], [1, 1]], offset=b))
    start = nl.ndarray((1, 1), dtype=dst_start.dtype, buffer=nl.sbuf)  # [1, 1] dst_start[b]
    nisa.dma_copy(dst=start, src=dst_start.ap(pattern=[[1, 1], [1, 1]], offset=b))
    staged = [(cache, nl.ndarray((H_kv, N, D), dtype=cache.dtype, buffer=nl.sbuf))  # [H_kv, N, D] per cache
              for cache in (k_cache, v_cache)]
    row = b * H_kv * S_max * D  # element offset of cache[b, 0, 0, 0]

    def gather(i):
        """staged[:, i, :] = cache[b, :, src_slots[b, i], :]"""
        slot = nl.ndarray((1, 1), dtype=src_slots.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=slot, src=src_slots.ap(pattern=[[N, 1], [1, 1]], offset=b * N, scalar_offset=i, indirect_dim=1))
        for cache, rows in staged:
            nisa.dma_copy(dst=_entry(rows, i), src=_slot_rows(cache, row, slot))

    def scatter(i):
        """cache[b, :, dst_start[b] + i, :] = staged[:, i, :]"""
        i_tile = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.register_store(i_tile, i)
        slot = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=slot, data1=i_tile, data2=start, op=nl.add)
        for cache, rows in staged:
            nisa.dma_copy(dst=_slot_rows(cache, row, slot), src=_entry(rows, i))

    nl.fori_loop(0, n, gather)  # every source is read ...
    nl.fori_loop(0, n, scatter)  # ... before any destination is written


def _slot_rows(cache, row, slot):
    """cache[b, :, slot, :] as [H_kv, D]: the pattern starts at slot 0 of row b; the runtime slot
    moves it along the slot axis (dimension 2)."""
    _, H_kv, S_max, D = cache.shape
    return cache.ap(pattern=[[S_max * D, H_kv], [1, D]], offset=row, scalar_offset=slot, indirect_dim=2)


def _entry(rows, i):
    """rows[:, i, :] of an [H_kv, N, D] SBUF tile, i a register."""
    H_kv, N, D = rows.shape
    return rows.ap(pattern=[[N * D, H_kv], [1, D]], offset=0, scalar_offset=i, indirect_dim=1)
