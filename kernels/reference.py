"""Torch reference twins of the kernel contract (always available, any device).

Every other backend is checked against these functions (``verispec.kernels.testing``).
They favour clarity over speed, but are written to be usable as the CPU production path:
no per-element Python loops, softmax in fp32, work proportional to the used cache length.
"""

from __future__ import annotations

import torch

__all__ = [
    "kv_append",
    "kv_gather",
    "verify_attention",
    "check_kv_append_args",
    "check_kv_gather_args",
    "check_verify_attention_args",
    "rms_norm",
    "add_rms_norm",
    "apply_rope",
    "rope_append",
    "silu_mul",
]


def _positions_list(positions: torch.Tensor, batch: int, name: str = "positions") -> list[int]:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(positions).__name__}")
    if positions.dim() != 1 or positions.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B={batch}], got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {positions.dtype}")
    return positions.tolist()


def check_kv_append_args(k_cache, v_cache, k_new, v_new, positions) -> list[int]:
    """Validate kv_append arguments; return positions as a host list."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [B, H_kv, S_max, D]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_new.dim() != 4 or k_new.shape != v_new.shape:
        raise ValueError(f"k_new/v_new must both be [B, H_kv, T, D]; got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    B, H_kv, S_max, D = k_cache.shape
    if (k_new.shape[0], k_new.shape[1], k_new.shape[3]) != (B, H_kv, D):
        raise ValueError(f"k_new {tuple(k_new.shape)} does not match cache [B={B}, H_kv={H_kv}, *, D={D}]")
    if k_new.dtype != k_cache.dtype or v_new.dtype != v_cache.dtype:
        raise TypeError(f"new K/V dtype {k_new.dtype} differs from cache dtype {k_cache.dtype}")
    T = k_new.shape[2]
    return check_append_slots(positions, B, T, S_max)


def check_append_slots(positions, batch: int, T: int, S_max: int) -> list[int]:
    """positions as a host list, each row's T slots inside the cache (else IndexError)."""
    pos = _positions_list(positions, batch)
    for b, p in enumerate(pos):
        if p < 0 or p + T > S_max:
            raise IndexError(
                f"kv_append out of range: row {b} writes slots {p}..{p + T - 1} but the cache holds {S_max} slots"
            )
    return pos


def kv_append(
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    k_new: torch.Tensor,  # [B, H_kv, T, D]
    v_new: torch.Tensor,  # [B, H_kv, T, D]
    positions: torch.Tensor,  # [B] int, first slot written per row
) -> None:
    """Write T new K/V rows per batch row at slots positions[b] .. positions[b]+T-1, in place."""
    pos = check_kv_append_args(k_cache, v_cache, k_new, v_new, positions)
    T = k_new.shape[2]
    if all(p == pos[0] for p in pos):
        p = pos[0]
        k_cache[:, :, p : p + T].copy_(k_new)
        v_cache[:, :, p : p + T].copy_(v_new)
        return
    for b, p in enumerate(pos):
        k_cache[b, :, p : p + T].copy_(k_new[b])
        v_cache[b, :, p : p + T].copy_(v_new[b])


def check_verify_attention_args(q, k_cache, v_cache, positions, active_mask) -> list[int]:
    """Validate verify_attention arguments; return positions as a host list."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [B, H_kv, S_max, D]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, H, T, D = q.shape
    Bc, H_kv, S_max, Dc = k_cache.shape
    if Bc != B or Dc != D:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} disagree on B or D")
    if H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads H_kv={H_kv} (GQA)")
    pos = _positions_list(positions, B)
    for b, p in enumerate(pos):
        if p < 0 or p + T > S_max:
            raise IndexError(f"verify_attention: row {b} attends slots 0..{p + T - 1} but the cache holds {S_max}")
    if active_mask is not None:
        if active_mask.dtype != torch.bool or tuple(active_mask.shape) != (B, T, T):
            raise ValueError(f"active_mask must be a bool tensor [B={B}, T={T}, T={T}], got {active_mask.dtype} {tuple(active_mask.shape)}")
    return pos


def attention_mask(
    positions: torch.Tensor,  # [B]
    T: int,
    S: int,
    active_mask: torch.Tensor | None = None,  # [B, T, T] bool
    start: int = 0,
) -> torch.Tensor:
    """Boolean mask [B, T, S - start]: query t of row b may see slot j (columns from ``start``).

    The rectangular (cache + new tokens) causal mask of a multi-token verify pass: the T new
    tokens sit at slots positions[b] .. positions[b]+T-1, so query t sees every prior slot and
    the active slots up to its own (bottom-right aligned). ``active_mask`` replaces that causal
    active part, e.g. for token trees.
    """
    dev = positions.device
    j = torch.arange(start, S, device=dev)  # [S - start]
    t = torch.arange(T, device=dev)  # [T]
    pos = positions.to(torch.long)[:, None, None]  # [B, 1, 1]
    if active_mask is None:
        return j[None, None, :] <= pos + t[None, :, None]
    prior = j[None, None, :] < pos  # [B, 1, S - start]
    rel = j[None, None, :] - pos  # [B, 1, S - start] slot index inside the active block
    in_active = (rel >= 0) & (rel < T)
    rel_c = rel.clamp(0, T - 1).expand(-1, T, -1)  # [B, T, S - start]
    act = torch.gather(active_mask, 2, rel_c) & in_active
    return prior | act


def verify_attention(
    q: torch.Tensor,  # [B, H, T, D]
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D], already holding the T new tokens
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    positions: torch.Tensor,  # [B] slot of each row's first new token
    scale: float,
    active_mask: torch.Tensor | None = None,  # [B, T, T] bool
) -> torch.Tensor:  # [B, H, T, D] in q.dtype
    """Attention of T new queries per row over the prior cache plus the active block."""
    pos = check_verify_attention_args(q, k_cache, v_cache, positions, active_mask)
    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv  # query heads per KV head; head h uses KV head h // G
    S = max(pos) + T  # slots any query can see; the rest of S_max is never read
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64 for tests)
    k = k_cache[:, :, :S].to(acc)  # [B, H_kv, S, D]
    v = v_cache[:, :, :S].to(acc)  # [B, H_kv, S, D]
    qf = q.to(acc).reshape(B, H_kv, G * T, D)  # [B, H_kv, G*T, D]
    scores = torch.matmul(qf, k.transpose(-1, -2)).mul_(scale)  # [B, H_kv, G*T, S]
    if not (T == 1 and active_mask is None and min(pos) == max(pos)):  # else every slot < S is visible
        p0 = min(pos)  # slots before p0 are prior slots of every row, seen by every query: mask from p0 only
        allowed = attention_mask(positions, T, S, active_mask, start=p0)  # [B, T, S - p0]
        block = scores[..., p0:].view(B, H_kv, G, T, S - p0)
        block.masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, H_kv, G*T, S] in acc
    out = torch.matmul(probs, v)  # [B, H_kv, G*T, D]
    return out.reshape(B, H, T, D).to(q.dtype)


# ---- layer glue: optional extras a backend may replace (``KernelSet.get``), same rounding ----


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * dtype(x * rsqrt(mean(x^2) + eps))``: normalise in fp32, scale in the model dtype
    (as the reference implementation does); F.rms_norm is that normalisation in one op."""
    xf = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm: ``(x + delta, rms_norm(x + delta))``."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation ``silu(gate) * up`` ([..., F] each), each op rounded to the model dtype
    as torch rounds it."""
    return torch.nn.functional.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x_2, x_1) (HF's form): the sign is
    folded into ``signed_sin`` (= cat(-sin_1, sin_2)), so the half swap is one roll; the same
    products, bit for bit, in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def rope_append(q, k, v, cos, signed_sin, k_cache, v_cache, positions, kv_append=None):
    """From the projections ``q`` [B, T, H D], ``k`` and ``v`` [B, T, H_kv D] and RoPE tables
    [B, 1, T, D]: rotate q and k, append k and v to the caches at ``positions`` (with
    ``kv_append``, default the reference's), return q [B, H, T, D]."""
    B, T, _ = q.shape
    D = k_cache.shape[-1]
    H, H_kv = q.shape[-1] // D, k.shape[-1] // D
    q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, signed_sin)  # [B, H, T, D]
    k = apply_rope(k.view(B, T, H_kv, D).transpose(1, 2), cos, signed_sin)  # [B, H_kv, T, D]
    (kv_append or globals()["kv_append"])(k_cache, v_cache, k, v.view(B, T, H_kv, D).transpose(1, 2), positions)
    return q


# ---- token trees: move the accepted path's K/V rows to contiguous slots ----


def _int_tensor(t, name: str, shape: tuple) -> list:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t.tolist()


def check_kv_gather_args(k_cache, v_cache, src_slots, dst_start, counts) -> tuple[list, list, list]:
    """Validate kv_gather arguments; return (src_slots, dst_start, counts) as host lists."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [B, H_kv, S_max, D]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} differs from v_cache dtype {v_cache.dtype}")
    B, _, S_max, _ = k_cache.shape
    if not isinstance(src_slots, torch.Tensor) or src_slots.dim() != 2 or src_slots.shape[0] != B:
        got = list(src_slots.shape) if isinstance(src_slots, torch.Tensor) else type(src_slots).__name__
        raise ValueError(f"src_slots must be [B={B}, N], got {got}")
    N = src_slots.shape[1]
    src = _int_tensor(src_slots, "src_slots", (B, N))
    start = _int_tensor(dst_start, "dst_start", (B,))
    cnt = _int_tensor(counts, "counts", (B,))
    for b in range(B):
        if not 0 <= cnt[b] <= N:
            raise ValueError(f"kv_gather: counts[{b}] = {cnt[b]} must be in 0..{N} (the entries of src_slots[{b}])")
        if cnt[b] and not (0 <= start[b] and start[b] + cnt[b] <= S_max):
            raise IndexError(f"kv_gather out of range: row {b} writes slots {start[b]}..{start[b] + cnt[b] - 1} "
                             f"but the cache holds {S_max} slots")
        for i, s in enumerate(src[b][: cnt[b]]):
            if not 0 <= s < S_max:
                raise IndexError(f"kv_gather out of range: row {b} entry {i} reads slot {s} but the cache holds {S_max} slots")
    return src, start, cnt


def kv_gather(
    k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
    src_slots: torch.Tensor,  # [B, N] int: slot of the i-th accepted node of row b
    dst_start: torch.Tensor,  # [B] int: first slot of row b's contiguous run
    counts: torch.Tensor,  # [B] int in 0..N: entries of src_slots[b] used
) -> None:
    """In place, per row b: slots dst_start[b] + i (i < counts[b]) receive the K/V rows that slots
    src_slots[b, i] held before the call (every source is read before anything is written, so
    sources may overlap destinations)."""
    src, start, cnt = check_kv_gather_args(k_cache, v_cache, src_slots, dst_start, counts)
    for b in range(len(cnt)):
        if cnt[b] == 0:
            continue
        idx = torch.tensor(src[b][: cnt[b]], device=k_cache.device)  # [c]
        d0 = start[b]
        for cache in (k_cache, v_cache):
            rows = cache[b].index_select(1, idx)  # [H_kv, c, D]: a copy, taken before the write
            cache[b, :, d0 : d0 + cnt[b]] = rows
