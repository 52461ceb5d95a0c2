"""Backend ``nki``: torch wrappers around the NKI kernels.

Tensors go to NumPy (no copy for contiguous CPU tensors; bf16 through ml_dtypes) and through
``nki.simulate`` (AWS's simulator where the real ``nki`` is installed, verispec's interpreter
otherwise). ``kv_append`` and ``kv_gather`` write the torch caches in place.

Calls the kernels cannot serve fall back to the torch reference for that call, with a logged
notice naming the reason: dtypes other than float32/bfloat16/float16, head_dim > 128, q and
cache dtypes that differ, token trees (``active_mask``) with more than 128 queries, and
``kv_gather`` calls whose staged rows would not fit SBUF.
Causal blocks of more than 128 queries (long prefills) are split into chunks of 128.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import torch

from .. import reference
from ._nki import REAL_NKI, nki
from .accept_reject import accept_reject_kernel
from .kv_append import kv_append_kernel
from .kv_gather import kv_gather_kernel
from .verify_attention import verify_attention_kernel

log = logging.getLogger("verispec.kernels.nki")

MAX_QUERIES = 128  # queries per kernel call: one per partition
MAX_HEAD_DIM = 128  # q^T and K^T put head_dim on the partitions
_NUMPY_DTYPES = {torch.float32: np.float32, torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}

# Interpreter counters of the latest call of each kernel (None under the real nki package).
last_stats: dict = {"verify_attention": None, "kv_append": None, "kv_gather": None, "accept_reject": None}
_noticed: set[str] = set()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy array with t's values; shares t's memory when t is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def _simulate(kernel, name: str, *args, **kwargs):
    sim = nki.simulate(kernel)
    out = sim(*args, **kwargs)
    last_stats[name] = getattr(sim, "stats", None)
    return out


def _fallback_notice(kernel: str, reason: str) -> None:
    key = f"{kernel}:{reason}"
    if key not in _noticed:  # once per distinct reason, not once per layer and step
        _noticed.add(key)
        log.warning("nki backend: %s falls back to the torch reference for %s", kernel, reason)


def _unsupported(*tensors: torch.Tensor) -> str | None:
    dt = tensors[0].dtype
    if dt not in _NUMPY_DTYPES:
        return f"dtype {dt} (the NKI kernels take float32, bfloat16, float16)"
    if any(t.dtype != dt for t in tensors):
        return f"mixed dtypes {sorted({str(t.dtype) for t in tensors})}"
    if tensors[0].shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {tensors[0].shape[-1]} > {MAX_HEAD_DIM}"
    return None


def kv_append(k_cache, v_cache, k_new, v_new, positions) -> None:
    """Contract of :func:`verispec.kernels.reference.kv_append`, through the NKI kernel."""
    reference.check_kv_append_args(k_cache, v_cache, k_new, v_new, positions)  # out of range: IndexError
    reason = _unsupported(k_cache, v_cache, k_new, v_new)
    if reason is not None:
        _fallback_notice("kv_append", reason)
        return reference.kv_append(k_cache, v_cache, k_new, v_new, positions)
    k_np, v_np = to_numpy(k_cache), to_numpy(v_cache)
    pos = positions.detach().cpu().to(torch.int32).numpy()
    _simulate(kv_append_kernel, "kv_append", k_np, v_np, to_numpy(k_new), to_numpy(v_new), pos)
    _write_back((k_cache, v_cache), (k_np, v_np))
    return None


def _write_back(caches, arrays) -> None:
    for dst, arr in zip(caches, arrays):
        if REAL_NKI or dst.device.type != "cpu" or not dst.is_contiguous():  # the kernel wrote a copy
            dst.copy_(from_numpy(arr, dst.device))


GATHER_SBUF_BYTES = 128 * 1024  # per partition for the staged K and V rows (of 224 KiB on trn2)


def kv_gather(k_cache, v_cache, src_slots, dst_start, counts) -> None:
    """Contract of :func:`verispec.kernels.reference.kv_gather`, through the NKI kernel."""
    src, _, cnt = reference.check_kv_gather_args(k_cache, v_cache, src_slots, dst_start, counts)  # IndexError/ValueError
    B, H_kv, _, D = k_cache.shape
    N = src_slots.shape[1]
    if N == 0 or not any(cnt):
        return None
    reason = _unsupported(k_cache, v_cache)
    if reason is None and H_kv > 128:
        reason = f"{H_kv} KV heads > 128 partitions"
    if reason is None and 2 * N * D * k_cache.element_size() > GATHER_SBUF_BYTES:
        reason = f"{N} rows of head_dim {D} staged for K and V exceed {GATHER_SBUF_BYTES // 1024} KiB of SBUF per partition"
    if reason is not None:
        _fallback_notice("kv_gather", reason)
        return reference.kv_gather(k_cache, v_cache, src_slots, dst_start, counts)
    k_np, v_np = to_numpy(k_cache), to_numpy(v_cache)
    # [B, N]: unused entries (never read by the kernel) zeroed, so any int converts to int32
    used = np.asarray([[s if i < c else 0 for i, s in enumerate(row)] for row, c in zip(src, cnt)], np.int32)
    _simulate(kv_gather_kernel, "kv_gather", k_np, v_np, used, dst_start.detach().cpu().to(torch.int32).numpy(),
              np.asarray(cnt, np.int32))
    _write_back((k_cache, v_cache), (k_np, v_np))
    return None


def verify_attention(q, k_cache, v_cache, positions, scale, active_mask=None) -> torch.Tensor:
    """Contract of :func:`verispec.kernels.reference.verify_attention`, through the NKI kernel."""
    pos = reference.check_verify_attention_args(q, k_cache, v_cache, positions, active_mask)
    B, H, T, D = q.shape
    reason = _unsupported(q, k_cache, v_cache)
    if reason is None and active_mask is not None and T > MAX_QUERIES:
        reason = f"a token tree of {T} > {MAX_QUERIES} queries"
    if reason is not None:
        _fallback_notice("verify_attention", reason)
        return reference.verify_attention(q, k_cache, v_cache, positions, scale, active_mask)
    k_np, v_np = to_numpy(k_cache), to_numpy(v_cache)
    outs = []
    for t0 in range(0, T, MAX_QUERIES):  # a causal block splits into query chunks exactly
        t1 = min(T, t0 + MAX_QUERIES)
        n = t1 - t0
        if active_mask is None:
            mask = np.broadcast_to(np.tril(np.ones((n, n), np.float32)), (B, n, n)).copy()  # [B, n, n]
        else:
            mask = active_mask.detach().cpu().numpy().astype(np.float32)  # [B, T, T]
        chunk_pos = np.asarray([p + t0 for p in pos], dtype=np.int32)  # [B] slot of the chunk's first query
        out = _simulate(
            verify_attention_kernel, "verify_attention", to_numpy(q[:, :, t0:t1]), k_np, v_np, chunk_pos, mask,
            scale=float(scale), prior_len=int(chunk_pos.max()),
        )
        outs.append(from_numpy(np.asarray(out), q.device))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def accept_reject(draft_ids, draft_probs, target_probs, uniforms, exponentials):
    """Contract of :func:`verispec.spec.rejection.rejection_sample` (same decisions given the
    same random numbers), through the NKI kernel. Returns (accepted [B] int64, tokens [B, g+1])."""
    from ...spec.rejection import check_shapes  # the contract's home; imported late: spec imports the model

    B, g, V = check_shapes(draft_ids, draft_probs, target_probs, uniforms, exponentials)
    if V >= 1 << 24:
        raise ValueError(f"vocabulary of {V} tokens: ids must stay exact in float32 (< 2^24)")
    f32 = lambda t: to_numpy(t.float())  # noqa: E731 - the rule is defined in fp32
    accepted, tokens = [], []
    for b0 in range(0, B, 128):  # one row per partition
        rows = slice(b0, min(B, b0 + 128))
        acc, tok = _simulate(
            accept_reject_kernel, "accept_reject", to_numpy(draft_ids[rows].to(torch.int32)), f32(draft_probs[rows]),
            f32(target_probs[rows]), f32(uniforms[rows]), f32(exponentials[rows]),
        )
        accepted.append(torch.from_numpy(np.asarray(acc)[:, 0].astype(np.int64)))
        tokens.append(torch.from_numpy(np.asarray(tok).astype(np.int64)))
    dev = target_probs.device
    return torch.cat(accepted).to(dev), torch.cat(tokens).to(dev)


def kernels() -> dict:
    """The kernels of backend ``nki`` (for ``register_backend_loader``); ``kv_gather`` and
    ``accept_reject`` are extra kernels (``KernelSet.get("kv_gather")``)."""
    return {"verify_attention": verify_attention, "kv_append": kv_append, "kv_gather": kv_gather,
            "accept_reject": accept_reject}
