"""NKI kernel: the exact accept/reject step of speculative decoding, on device.

Same rule, decision for decision, as :func:`verispec.spec.rejection.rejection_sample` given the
same random numbers: draft i is accepted iff ``uniforms * q_i(x_i) < p_i(x_i)`` (fp32), the
first rejection stops the row; the emitted token is ``argmax_v r_v / exponentials_v`` (lowest id
on ties) with r the residual ``max(p_a - q_a, 0)`` at the first unaccepted slot a, or ``p_a``
itself when every draft was accepted (bonus) or the residual has no mass.

Layout: one batch row per partition (B <= 128), the vocabulary streamed from HBM in tiles of
``VOCAB_TILE``. Every selection is exact arithmetic on 0/1 masks (``x * 1``, ``x * 0``, ``x + 0``),
so the values compared are bit-identical to the reference's.
"""

from __future__ import annotations

from ._nki import nki, nisa, nl

VOCAB_TILE = 2048  # vocabulary entries per tile (8 KiB of fp32 per partition)
NO_TOKEN = 1.0e9  # larger than any token id: "no candidate" in the argmax-index search


@nki.jit
def accept_reject_kernel(draft_ids, draft_probs, target_probs, uniforms, exponentials):
    """draft_ids [B, g] int32; draft_probs [B, g, V], target_probs [B, g+1, V], uniforms [B, g],
    exponentials [B, V] float32. Returns accepted [B, 1] and tokens [B, g+1] int32 (-1 after the
    emitted token)."""
    B, G1, V = target_probs.shape
    g = G1 - 1
    n_tiles = (V + VOCAB_TILE - 1) // VOCAB_TILE
    accepted = nl.ndarray((B, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    tokens = nl.ndarray((B, G1), dtype=nl.int32, buffer=nl.shared_hbm)
    score_hbm = nl.ndarray((B, V), dtype=nl.float32, buffer=nl.private_hbm)  # r / exponentials

    n_acc = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # accepted drafts per row
    nisa.memset(dst=n_acc, value=0.0)
    ids = nl.ndarray((B, max(g, 1)), dtype=nl.float32, buffer=nl.sbuf)  # [B, g] draft ids as floats (exact < 2^24)
    nisa.memset(dst=ids, value=0.0)
    if g > 0:
        ids_i = nl.ndarray((B, g), dtype=draft_ids.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=ids_i, src=draft_ids)
        nisa.tensor_copy(dst=ids[:, 0:g], src=ids_i)
        _accept_tests(draft_probs, target_probs, uniforms, ids, n_acc, n_tiles)

    # which slot each row emits from: p at slot a = n_acc, q at slot min(a, g-1)
    use_p = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # 1: sample from p_a (bonus or empty residual)
    nisa.tensor_scalar(dst=use_p, data=n_acc, op0=nl.equal, operand0=float(g))
    if g > 0:
        res_sum = nl.zeros((B, 1), dtype=nl.float32, buffer=nl.sbuf)
        for vt in range(n_tiles):  # pass 1: mass of the residual
            _, res = _tile_p_and_residual(draft_probs, target_probs, n_acc, vt, V, g)
            part = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=part, op=nl.add, data=res, axis=1)
            nisa.tensor_tensor(dst=res_sum, data1=res_sum, data2=part, op=nl.add)
        empty = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=empty, data=res_sum, op0=nl.less_equal, operand0=0.0)
        nisa.tensor_tensor(dst=use_p, data1=use_p, data2=empty, op=nl.maximum)
    use_res = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # 1 - use_p
    nisa.tensor_scalar(dst=use_res, data=use_p, op0=nl.subtract, operand0=1.0, reverse0=True)

    best = nl.full((B, 1), -1.0, dtype=nl.float32, buffer=nl.sbuf)  # running max score (scores are >= 0)
    for vt in range(n_tiles):  # pass 2: scores r / exponentials and their max
        v0 = vt * VOCAB_TILE
        n = min(VOCAB_TILE, V - v0)
        p_a, res = _tile_p_and_residual(draft_probs, target_probs, n_acc, vt, V, g)
        r = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)  # p_a * use_p + res * (1 - use_p), exactly
        nisa.tensor_scalar(dst=r, data=p_a, op0=nl.multiply, operand0=use_p)
        if g > 0:
            nisa.tensor_scalar(dst=res, data=res, op0=nl.multiply, operand0=use_res)
            nisa.tensor_tensor(dst=r, data1=r, data2=res, op=nl.add)
        e = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=e, src=exponentials[:, v0:v0 + n])
        score = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=score, data1=r, data2=e, op=nl.divide)
        nisa.dma_copy(dst=score_hbm[:, v0:v0 + n], src=score)
        tile_max = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=tile_max, op=nl.maximum, data=score, axis=1)
        nisa.tensor_tensor(dst=best, data1=best, data2=tile_max, op=nl.maximum)

    emitted = nl.full((B, 1), NO_TOKEN, dtype=nl.float32, buffer=nl.sbuf)  # lowest id reaching the max
    for vt in range(n_tiles):  # pass 3: argmax, lowest id on ties
        v0 = vt * VOCAB_TILE
        n = min(VOCAB_TILE, V - v0)
        score = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=score, src=score_hbm[:, v0:v0 + n])
        at_max = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=at_max, data=score, op0=nl.equal, operand0=best)
        vid = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)  # token id v0 + f
        nisa.iota(dst=vid, pattern=[[1, n]], offset=v0, channel_multiplier=0)
        nisa.tensor_tensor(dst=vid, data1=vid, data2=at_max, op=nl.multiply)
        not_max = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)  # NO_TOKEN where not at the max
        nisa.tensor_scalar(dst=not_max, data=at_max, op0=nl.subtract, operand0=1.0, reverse0=True,
                           op1=nl.multiply, operand1=NO_TOKEN)
        nisa.tensor_tensor(dst=vid, data1=vid, data2=not_max, op=nl.add)
        tile_min = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=tile_min, op=nl.minimum, data=vid, axis=1)
        nisa.tensor_tensor(dst=emitted, data1=emitted, data2=tile_min, op=nl.minimum)

    _write_tokens(tokens, accepted, ids, n_acc, emitted, g)
    return accepted, tokens


def _accept_tests(draft_probs, target_probs, uniforms, ids, n_acc, n_tiles):
    """n_acc = length of the prefix of drafts with uniforms * q(x) < p(x)."""
    B, g, V = draft_probs.shape
    p_x = nl.zeros((B, g), dtype=nl.float32, buffer=nl.sbuf)  # p_i(x_i): one-hot dot over the vocabulary
    q_x = nl.zeros((B, g), dtype=nl.float32, buffer=nl.sbuf)
    for vt in range(n_tiles):
        v0 = vt * VOCAB_TILE
        n = min(VOCAB_TILE, V - v0)
        vid = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=vid, pattern=[[1, n]], offset=v0, channel_multiplier=0)
        for i in range(g):
            hot = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)  # 1 at draft i's token
            nisa.tensor_scalar(dst=hot, data=vid, op0=nl.equal, operand0=ids[:, i:i + 1])
            _dot_into(p_x[:, i:i + 1], target_probs.ap(pattern=[[(g + 1) * V, B], [1, n]], offset=i * V + v0), hot)
            _dot_into(q_x[:, i:i + 1], draft_probs.ap(pattern=[[g * V, B], [1, n]], offset=i * V + v0), hot)
    u = nl.ndarray((B, g), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=u, src=uniforms)
    nisa.tensor_tensor(dst=u, data1=u, data2=q_x, op=nl.multiply)
    ok = nl.ndarray((B, g), dtype=nl.float32, buffer=nl.sbuf)  # 1 where draft i passes its test
    nisa.tensor_tensor(dst=ok, data1=u, data2=p_x, op=nl.less)
    alive = nl.full((B, 1), 1.0, dtype=nl.float32, buffer=nl.sbuf)  # no rejection so far
    for i in range(g):
        nisa.tensor_tensor(dst=alive, data1=alive, data2=ok[:, i:i + 1], op=nl.multiply)
        nisa.tensor_tensor(dst=n_acc, data1=n_acc, data2=alive, op=nl.add)


def _dot_into(acc_col, src, hot):
    """acc_col [B, 1] += sum(src * hot): exactly the one selected value (the rest add zeros)."""
    B, n = hot.shape
    t = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    nisa.tensor_tensor(dst=t, data1=t, data2=hot, op=nl.multiply)
    s = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=s, op=nl.add, data=t, axis=1)
    nisa.tensor_tensor(dst=acc_col, data1=acc_col, data2=s, op=nl.add)


def _tile_p_and_residual(draft_probs, target_probs, n_acc, vt, V, g):
    """One vocabulary tile of p_a and of max(p_a - q_a, 0) (None when there are no drafts)."""
    B = target_probs.shape[0]
    v0 = vt * VOCAB_TILE
    n = min(VOCAB_TILE, V - v0)
    p_a = _select_slot(target_probs, n_acc, g + 1, V, v0, n)
    if g == 0:
        return p_a, None
    q_a = _select_slot(draft_probs, n_acc, g, V, v0, n)
    res = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=res, data1=p_a, data2=q_a, op=nl.subtract)
    nisa.tensor_scalar(dst=res, data=res, op0=nl.maximum, operand0=0.0)
    return p_a, res


def _select_slot(probs, n_acc, n_slots, V, v0, n):
    """probs[b, min(n_acc[b], n_slots-1), v0:v0+n] for every row b, as sum_i [slot == i] * probs[b, i]
    (probs is [B, n_slots, V])."""
    B = probs.shape[0]
    out = nl.zeros((B, n), dtype=nl.float32, buffer=nl.sbuf)
    for i in range(n_slots):
        pick = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # 1 where this row reads slot i
        if i == n_slots - 1:  # the last slot also serves every row past it
            nisa.tensor_scalar(dst=pick, data=n_acc, op0=nl.greater_equal, operand0=float(i))
        else:
            nisa.tensor_scalar(dst=pick, data=n_acc, op0=nl.equal, operand0=float(i))
        t = nl.ndarray((B, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=probs.ap(pattern=[[n_slots * V, B], [1, n]], offset=i * V + v0))
        nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=pick)
        nisa.tensor_tensor(dst=out, data1=out, data2=t, op=nl.add)
    return out


def _write_tokens(tokens, accepted, ids, n_acc, emitted, g):
    """tokens[b, i] = draft i (i < a), the emitted token (i = a), -1 (i > a); accepted[b] = a."""
    B = n_acc.shape[0]
    tok = nl.ndarray((B, g + 1), dtype=nl.float32, buffer=nl.sbuf)
    for i in range(g + 1):
        col = tok[:, i:i + 1]
        at = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # 1 where i == a
        nisa.tensor_scalar(dst=at, data=n_acc, op0=nl.equal, operand0=float(i))
        nisa.tensor_tensor(dst=col, data1=emitted, data2=at, op=nl.multiply)
        after = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # -1 where i > a
        nisa.tensor_scalar(dst=after, data=n_acc, op0=nl.less, operand0=float(i), op1=nl.multiply, operand1=-1.0)
        nisa.tensor_tensor(dst=col, data1=col, data2=after, op=nl.add)
        if i < g:
            kept = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)  # the draft where i < a
            nisa.tensor_scalar(dst=kept, data=n_acc, op0=nl.greater, operand0=float(i))
            nisa.tensor_tensor(dst=kept, data1=kept, data2=ids[:, i:i + 1], op=nl.multiply)
            nisa.tensor_tensor(dst=col, data1=col, data2=kept, op=nl.add)
    tok_i = nl.ndarray((B, g + 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=tok_i, src=tok)
    nisa.dma_copy(dst=tokens, src=tok_i)
    acc_i = nl.ndarray((B, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=acc_i, src=n_acc)
    nisa.dma_copy(dst=accepted, src=acc_i)
