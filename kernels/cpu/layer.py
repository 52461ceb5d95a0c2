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


def rope_append(qkv, cos, signed_sin, k_cache, v_cache, positions, n_heads: int, n_kv_heads: int, kv_append=None):
    """reference.rope_append in one native call (with the reference's cache append semantics)."""
    lib = get_lib()
    B, T, W = qkv.shape
    D = k_cache.shape[-1]
    fits = (
        lib is not None
        and kv_append in (None, reference.kv_append)  # another backend's append is not ours to fuse
        and _native(qkv, cos, signed_sin, k_cache, v_cache)
        and W == (n_heads + 2 * n_kv_heads) * D
        and cos.shape == signed_sin.shape == (B, 1, T, D)
        and k_cache.shape == v_cache.shape == (B, n_kv_heads, k_cache.shape[2], D)
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )
    if not fits:
        return reference.rope_append(qkv, cos, signed_sin, k_cache, v_cache, positions, n_heads, n_kv_heads, kv_append)
    S_max = k_cache.shape[2]
    pos_t = torch.tensor(reference.check_append_slots(positions, B, T, S_max), dtype=torch.int64)
    qkv, cos, signed_sin = qkv.contiguous(), cos.contiguous(), signed_sin.contiguous()
    q = torch.empty(B, n_heads, T, D, dtype=qkv.dtype)
    lib.verispec_rope_append(qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), pos_t.data_ptr(), q.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), B, T, n_heads, n_kv_heads, D, S_max,
                             int(qkv.dtype == torch.bfloat16))
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """reference.silu_mul in one native call (fused.c's verispec_silu_mul, vectorised and split
    over the threads): ``dtype(dtype(silu(gate)) * up)`` for ``gate_up`` [..., 2F] = [gate | up].
    Its e^x is not torch's, so the fp32 silu may differ from the reference's in the last bit
    (below a bf16 ulp after rounding); the fused layer calls the same function."""
    lib = get_lib()
    if lib is None or gate_up.dim() == 0 or gate_up.shape[-1] % 2 or not _native(gate_up):
        return reference.silu_mul(gate_up)
    gate_up = gate_up.contiguous()
    F2 = gate_up.shape[-1]
    out = torch.empty(*gate_up.shape[:-1], F2 // 2, dtype=gate_up.dtype)
    lib.verispec_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // F2 if F2 else 0, F2 // 2,
                          int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return out
