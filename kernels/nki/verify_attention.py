"""NKI kernel: multi-token verify attention (T <= 128 new queries per row) over a KV cache.

Design (after AWS's public token-generation attention kernels): the scores of the queries
against the *active* block (the T new tokens, at the runtime slot ``positions[b]``) and against
the *prior* cache (slots ``0 .. positions[b]-1``) are computed separately, each with its own
mask, and combined in one online softmax in float32:

* active block: K/V read through an access pattern whose ``scalar_offset`` is the runtime
  position; its mask is the [T, T] ``active_mask`` input (causal, or a token tree);
* prior cache: tiles of at most 512 slots (one PSUM bank of fp32 scores), masked by comparing
  each slot index (``iota``) with the runtime position, so stale slots past a row's position
  never count. ``prior_len`` (the largest position in the batch) is the static bound of the
  loop, as a compiled kernel's shape bucket would be.

Layout: for each (batch row b, KV head g), the G = H / H_kv query heads that share g and their T
queries form ``rows = heads x T`` partitions (chunks of <= 128 rows), so one K tile serves every
head of the group (GQA). Scores: ``nc_matmul(stationary=q^T [D, rows], moving=K^T [D, n])``;
``P @ V`` contracts over slots in blocks of 128 (``P^T`` through a tensor-engine transpose).
"""

from __future__ import annotations

from ._nki import nki, nisa, nl

TILE_S = 512  # prior slots per online-softmax step: [rows, 512] fp32 scores fill one PSUM bank
SUB_S = 128  # slots per P @ V matmul (the contraction runs over partitions)
MASKED = 1.0e30  # subtracted from masked scores; exp() of the result is exactly 0 in fp32


@nki.jit
def verify_attention_kernel(q, k_cache, v_cache, positions, active_mask, scale, prior_len):
    """q [B, H, T, D]; k_cache, v_cache [B, H_kv, S_max, D] already holding the T new rows at
    slots positions[b] ..; positions [B] int32; active_mask [B, T, T] float32 (1 = query t sees
    active token t'); scale and prior_len (= max(positions)) are compile-time constants.
    Returns out [B, H, T, D] in q's dtype."""
    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv  # query heads per KV head
    heads_per_chunk = min(G, 128 // T)
    n_chunks = (G + heads_per_chunk - 1) // heads_per_chunk
    out = nl.ndarray((B, H, T, D), dtype=q.dtype, buffer=nl.shared_hbm)
    for b in range(B):
        pos = nl.ndarray((1, 1), dtype=positions.dtype, buffer=nl.sbuf)  # [1, 1] slot of the first new token
        nisa.dma_copy(dst=pos, src=positions.ap(pattern=[[1, 1], [1, 1]], offset=b))
        for g in range(H_kv):
            for c in range(n_chunks):
                h0 = c * heads_per_chunk
                _attend_chunk(q, k_cache, v_cache, positions, active_mask, out, pos, b, g, h0,
                              min(heads_per_chunk, G - h0), scale, prior_len)
    return out


def _attend_chunk(q, k_cache, v_cache, positions, active_mask, out, pos, b, g, h0, n_heads, scale, prior_len):
    """Query heads g*G+h0 .. +n_heads of row b (all their T queries) against KV head g."""
    B, H, T, D = q.shape
    H_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    rows = n_heads * T  # partition r = (head r // T, query r % T)
    kv_base = (b * H_kv + g) * S_max * D  # element offset of cache[b, g, 0, 0]
    q_base = ((b * H + g * G + h0) * T) * D  # element offset of q[b, g*G+h0, 0, 0]

    q_t = nl.ndarray((D, rows), dtype=q.dtype, buffer=nl.sbuf)  # [D, rows] queries, transposed by the DMA
    nisa.dma_copy(dst=q_t, src=q.ap(pattern=[[1, D], [D, rows]], offset=q_base))

    # ---- active block: the T new tokens at runtime slot pos, masked by active_mask ----
    k_act = nl.ndarray((D, T), dtype=k_cache.dtype, buffer=nl.sbuf)  # [D, T]
    nisa.dma_copy(dst=k_act, src=k_cache.ap(pattern=[[1, D], [D, T]], offset=kv_base, scalar_offset=pos, indirect_dim=2))
    v_act = nl.ndarray((T, D), dtype=v_cache.dtype, buffer=nl.sbuf)  # [T, D]
    nisa.dma_copy(dst=v_act, src=v_cache.ap(pattern=[[D, T], [1, D]], offset=kv_base, scalar_offset=pos, indirect_dim=2))
    mask = nl.ndarray((rows, T), dtype=nl.float32, buffer=nl.sbuf)  # [rows, T] active_mask[b, r % T, :]
    nisa.dma_copy(dst=mask, src=active_mask.ap(pattern=[[0, n_heads], [T, T], [1, T]], offset=b * T * T))
    bias = nl.ndarray((rows, T), dtype=nl.float32, buffer=nl.sbuf)  # 0 where visible, -1e30 where not
    nisa.tensor_scalar(dst=bias, data=mask, op0=nl.subtract, operand0=1.0, op1=nl.multiply, operand1=MASKED)
    scores = _scores(q_t, k_act, bias, rows, T, scale)

    # the running softmax state starts from the active block (every query sees itself)
    m = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)  # running max
    nisa.tensor_reduce(dst=m, op=nl.maximum, data=scores, axis=1)
    neg_m = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg_m, data=m, op0=nl.multiply, operand0=-1.0)
    p = nl.ndarray((rows, T), dtype=nl.float32, buffer=nl.sbuf)  # exp(scores - m)
    nisa.activation(dst=p, op=nl.exp, data=scores, bias=neg_m)
    l_sum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)  # running sum of p
    nisa.tensor_reduce(dst=l_sum, op=nl.add, data=p, axis=1)
    pv = nl.ndarray((rows, D), dtype=nl.float32, buffer=nl.psum)
    _p_times_v(pv, p, v_act, v_cache, 0)
    acc = nl.ndarray((rows, D), dtype=nl.float32, buffer=nl.sbuf)  # running sum of p @ V
    nisa.tensor_copy(dst=acc, src=pv)

    # ---- prior cache: slots 0 .. pos-1, in tiles of TILE_S, masked by slot < pos ----
    if prior_len > 0:
        pos_col = nl.ndarray((rows, 1), dtype=positions.dtype, buffer=nl.sbuf)  # pos on every partition
        nisa.dma_copy(dst=pos_col, src=positions.ap(pattern=[[0, rows], [1, 1]], offset=b))
        last_prior = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)  # pos - 1
        nisa.tensor_scalar(dst=last_prior, data=pos_col, op0=nl.subtract, operand0=1.0)
    for ti in range((prior_len + TILE_S - 1) // TILE_S):  # carries m, l_sum, acc
        s0 = ti * TILE_S
        n = min(TILE_S, prior_len - s0)
        k_t = nl.ndarray((D, n), dtype=k_cache.dtype, buffer=nl.sbuf)  # [D, n] keys, transposed by the DMA
        nisa.dma_copy(dst=k_t, src=k_cache.ap(pattern=[[1, D], [D, n]], offset=kv_base + s0 * D))
        slot = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)  # slot index s0 + f
        nisa.iota(dst=slot, pattern=[[1, n]], offset=s0, channel_multiplier=0)
        bias = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)  # min(pos-1-slot, 0) * 1e30
        nisa.tensor_scalar(dst=bias, data=slot, op0=nl.subtract, operand0=last_prior, reverse0=True,
                           op1=nl.minimum, operand1=0.0)
        nisa.tensor_scalar(dst=bias, data=bias, op0=nl.multiply, operand0=MASKED)
        scores = _scores(q_t, k_t, bias, rows, n, scale)

        tile_max = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=tile_max, op=nl.maximum, data=scores, axis=1)
        m_new = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=m_new, data1=m, data2=tile_max, op=nl.maximum)
        neg_m = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=neg_m, data=m_new, op0=nl.multiply, operand0=-1.0)
        corr = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)  # exp(m_old - m_new)
        nisa.activation(dst=corr, op=nl.exp, data=m, bias=neg_m)
        p = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=p, op=nl.exp, data=scores, bias=neg_m)
        p_sum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=p_sum, op=nl.add, data=p, axis=1)
        nisa.tensor_scalar(dst=l_sum, data=l_sum, op0=nl.multiply, operand0=corr)
        nisa.tensor_tensor(dst=l_sum, data1=l_sum, data2=p_sum, op=nl.add)
        pv = nl.ndarray((rows, D), dtype=nl.float32, buffer=nl.psum)
        _p_times_v(pv, p, None, v_cache, kv_base + s0 * D)
        nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=corr)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=pv, op=nl.add)
        nisa.tensor_copy(dst=m, src=m_new)

    # ---- normalize and store ----
    inv_l = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_l, data=l_sum)
    o = nl.ndarray((rows, D), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o, data=acc, op0=nl.multiply, operand0=inv_l)
    nisa.dma_copy(dst=out.ap(pattern=[[D, rows], [1, D]], offset=q_base), src=o)


def _scores(q_t, k_t, bias, rows, n, scale):
    """[rows, n] fp32 SBUF: (q @ k^T) * scale + bias."""
    s_psum = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=s_psum, stationary=q_t, moving=k_t)
    scores = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=scores, data=s_psum, op0=nl.multiply, operand0=scale)
    nisa.tensor_tensor(dst=scores, data1=scores, data2=bias, op=nl.add)
    return scores


def _p_times_v(pv, p, v_active, v_cache, v_offset):
    """pv [rows, D] = p [rows, n] @ V, contracting over slots in blocks of SUB_S on partitions.
    V is ``v_active`` (already in SBUF) or the n rows of ``v_cache`` from element v_offset."""
    rows, n = p.shape
    D = pv.shape[1]
    v_dtype = v_cache.dtype
    for kb in range((n + SUB_S - 1) // SUB_S):  # accumulation into pv is associative
        k0 = kb * SUB_S
        kn = min(SUB_S, n - k0)
        p_t_psum = nl.ndarray((kn, rows), dtype=nl.float32, buffer=nl.psum)  # [kn, rows]
        nisa.nc_transpose(dst=p_t_psum, data=p[:, k0:k0 + kn])
        p_t = nl.ndarray((kn, rows), dtype=v_dtype, buffer=nl.sbuf)  # in V's dtype for the matmul
        nisa.tensor_copy(dst=p_t, src=p_t_psum)
        if v_active is not None:
            v_blk = v_active
        else:
            v_blk = nl.ndarray((kn, D), dtype=v_dtype, buffer=nl.sbuf)  # [kn, D]
            nisa.dma_copy(dst=v_blk, src=v_cache.ap(pattern=[[D, kn], [1, D]], offset=v_offset + k0 * D))
        nisa.nc_matmul(dst=pv, stationary=p_t, moving=v_blk)
