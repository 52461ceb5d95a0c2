"""Layer glue of the ``cpu`` backend (layer.c, fused.c): RMSNorm with the residual add, RoPE with
the k/v cache append, and SiLU(gate) * up, each one native call instead of a handful of torch
operators.

Extras of the backend (``KernelSet.get``), not part of the kernel contract: the decoder uses the
torch reference (kernels/reference.py) where a backend has none. Same rounding as the reference
at every step; RMSNorm's fp32 sum of squares may differ from torch's in the last bit (another
summation order). Where the tensors do not fit (device, dtype, layout) the reference runs.
"""

from __future__ import annotations

import torch

from .. import reference
from .build import get_lib

_DTYPES = (torch.bfloat16, torch.float32)


def _native(*ts: torch.Tensor) -> bool:
    d = ts[0].dtype
    return d in _DTYPES and all(t.device.type == "cpu" and t.dtype == d and not t.requires_grad for t in ts)


def _norm(x, delta, weight, eps):
    lib = get_lib()
    E = x.shape[-1]
    if lib is None or weight.shape != (E,) or not _native(x, weight, *([delta] if delta is not None else [])):
        return None
    if delta is not None and delta.shape != x.shape:
        return None
    x = x.contiguous()
    delta = delta.contiguous() if delta is not None else None
    weight = weight.contiguous()
    y = torch.empty_like(x)
    h = torch.empty_like(x) if delta is not None else None
    lib.verispec_rms_norm(x.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(),
                          h.data_ptr() if h is not None else None, y.data_ptr(), x.numel() // E if E else 0, E,
                          float(eps), int(x.dtype == torch.bfloat16))
    return h, y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """reference.rms_norm in one native call."""
    out = _norm(x, None, weight, eps)
    return reference.rms_norm(x, weight, eps) if out is None else out[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """reference.add_rms_norm in one native call: (x + delta, rms_norm(x + delta))."""
    out = _norm(x, delta, weight, eps)
    return reference.add_rms_norm(x, delta, weight, eps) if out is None else out


def _rows(*ts: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """``ts`` [B, T, W_i] as tensors whose rows all lie ``ld`` values apart (views into one fused
    output keep their memory; anything else is made contiguous) and that ``ld``."""
    def ld(t):
        B, T, W = t.shape
        ok = t.stride(2) == 1 and (T == 1 or t.stride(1) >= W) and (B == 1 or t.stride(0) == T * t.stride(1))
        return t.stride(1) if ok else None

    lds = {ld(t) for t in ts}
    if len(lds) == 1 and None not in lds:
        return list(ts), lds.pop()
    ts = [t.contiguous() for t in ts]
    if len({t.shape[-1] for t in ts}) != 1:
        return ts, None
    return ts, ts[0].shape[-1]


def rope_append(q, k, v, cos, signed_sin, k_cache, v_cache, positions, kv_append=None):
    """reference.rope_append in one native call (with the reference's cache append semantics)."""
    lib = get_lib()
    B, T, HD = q.shape
    D = k_cache.shape[-1]
    H, H_kv = HD // D, k.shape[-1] // D
    fits = (
        lib is not None
        and kv_append in (None, reference.kv_append)  # another backend's append is not ours to fuse
        and _native(q, k, v, cos, signed_sin, k_cache, v_cache)
        and HD == H * D and k.shape == v.shape == (B, T, H_kv * D)
        and cos.shape == signed_sin.shape == (B, 1, T, D)
        and k_cache.shape == v_cache.shape == (B, H_kv, k_cache.shape[2], D)
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )
    if not fits:
        return reference.rope_append(q, k, v, cos, signed_sin, k_cache, v_cache, positions, kv_append)
    S_max = k_cache.shape[2]
    pos_t = torch.tensor(reference.check_append_slots(positions, B, T, S_max), dtype=torch.int64)
    (q,), ldq = _rows(q)
    (k, v), ldkv = _rows(k, v)
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    out = torch.empty(B, H, T, D, dtype=q.dtype)
    lib.verispec_rope_append(q.data_ptr(), ldq, k.data_ptr(), v.data_ptr(), ldkv, cos.data_ptr(), signed_sin.data_ptr(),
                             pos_t.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), B, T, H, H_kv, D,
                             S_max, int(q.dtype == torch.bfloat16))
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.silu_mul in one native call (fused.c's verispec_silu_mul, vectorised and split
    over the threads): ``dtype(dtype(silu(gate)) * up)`` for ``gate``, ``up`` [..., F]. Its e^x is
    not torch's, so the fp32 silu may differ from the reference's in the last bit (below a bf16
    ulp after rounding); the native decoder step calls the same function."""
    lib = get_lib()
    if lib is None or gate.dim() == 0 or gate.shape != up.shape or not _native(gate, up):
        return reference.silu_mul(gate, up)
    F_ = gate.shape[-1]
    (g, u), ld = _rows(gate.reshape(1, -1, F_), up.reshape(1, -1, F_))
    out = torch.empty(gate.shape, dtype=gate.dtype)
    lib.verispec_silu_mul(g.data_ptr(), u.data_ptr(), ld, out.data_ptr(), gate.numel() // F_ if F_ else 0, F_,
                          int(gate.dtype == torch.bfloat16), torch.get_num_threads())
    return out
