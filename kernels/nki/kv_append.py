"""NKI kernel: append T new K/V rows per batch row at a runtime cache position.

The position is a runtime value (``positions[b]``, loaded into SBUF) used as the
``scalar_offset`` of an access pattern on the cache, so one compiled kernel serves every
position. The copy is HBM to HBM on the DMA engines. A write past the cache is a DMA bounds
error (``oob_mode.error``): the offset is checked along the cache's slot axis, so a bad
position can never spill into the next head's rows.
"""

from __future__ import annotations

from ._nki import nki, nisa, nl


@nki.jit
def kv_append_kernel(k_cache, v_cache, k_new, v_new, positions):
    """k_cache, v_cache [B, H_kv, S_max, D] (written in place); k_new, v_new [B, H_kv, T, D];
    positions [B] int32: the first slot written in row b."""
    B, H_kv, S_max, D = k_cache.shape
    T = k_new.shape[2]
    for b in range(B):
        pos = nl.ndarray((1, 1), dtype=positions.dtype, buffer=nl.sbuf)  # [1, 1] this row's first slot
        nisa.dma_copy(dst=pos, src=positions.ap(pattern=[[1, 1], [1, 1]], offset=b))
        _append_rows(k_cache, k_new, pos, b)
        _append_rows(v_cache, v_new, pos, b)


def _append_rows(cache, new, pos, b):
    """cache[b, :, pos:pos+T, :] = new[b] in one DMA, the slot offset taken at runtime."""
    _, H_kv, S_max, D = cache.shape
    T = new.shape[2]
    nisa.dma_copy(
        dst=cache.ap(
            pattern=[[S_max * D, H_kv], [D, T], [1, D]],  # [H_kv, T, D] starting at slot 0 of row b ...
            offset=b * H_kv * S_max * D,
            scalar_offset=pos,  # ... moved to slot pos along the slot axis
            indirect_dim=2,
        ),
        src=new.ap(pattern=[[T * D, H_kv], [D, T], [1, D]], offset=b * H_kv * T * D),
    )
