"""The ``cpu`` kernel backend: verify attention for decode and verify passes in one native call
(attention.c), the torch reference for everything else.

Native where it pays and applies: CPU tensors, q and caches of one dtype (bf16 or fp32),
contiguous, T <= MAX_T new tokens per row, with or without a token tree's ``active_mask``
(bool [B, T, T], passed to the kernel as uint8). Prefill (large T), a mask on another device and
other dtypes go to the reference. ``kv_append`` is the reference's (a slice copy).
Checked against the reference by :func:`verispec.kernels.testing.check_backend`.
"""

from __future__ import annotations

import torch

from .. import reference
from .build import get_lib

MAX_T = 16  # queries per row handled natively; longer blocks (prefill) use the reference


def _native_applies(q, k_cache, v_cache, active_mask) -> bool:
    return (
        (active_mask is None or active_mask.device.type == "cpu")
        and q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float32)
        and k_cache.dtype == q.dtype == v_cache.dtype
        and q.shape[2] <= MAX_T
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )


def verify_attention(q, k_cache, v_cache, positions, scale, active_mask=None):
    """The contract's verify_attention (see kernels/reference.py)."""
    lib = get_lib()
    if lib is None or not _native_applies(q, k_cache, v_cache, active_mask):
        return reference.verify_attention(q, k_cache, v_cache, positions, scale, active_mask)
    reference.check_verify_attention_args(q, k_cache, v_cache, positions, active_mask)  # raises on bad input
    q = q.contiguous()  # [B, H, T, D]; the decoder's q is a transposed view when T > 1
    B, H, T, D = q.shape
    H_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    pos = positions.to(device="cpu", dtype=torch.int64).contiguous()
    mask = None if active_mask is None else active_mask.to(torch.uint8).contiguous()  # [B, T, T], 1: visible
    out = torch.empty_like(q)
    rc = lib.verispec_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(),
                                None if mask is None else mask.data_ptr(), out.data_ptr(),
                                B, H, H_kv, T, D, S_max, float(scale), int(q.dtype == torch.bfloat16),
                                torch.get_num_threads())
    if rc != 0:
        raise MemoryError("verispec_attention: could not allocate its scratch buffers")
    return out


def load() -> dict:
    """Kernels of the ``cpu`` backend (registered lazily in kernels/registry.py)."""
    if get_lib() is None:
        from .build import build_error

        raise ImportError(f"the native CPU kernels are unavailable: {build_error()}")
    from . import compiled, gather, layer, quant, sampling

    return {
        "verify_attention": verify_attention,
        "kv_append": reference.kv_append,
        "kv_gather": gather.kv_gather,
        "rms_norm": layer.rms_norm,
        "add_rms_norm": layer.add_rms_norm,
        "rope_append": layer.rope_append,
        "silu_mul": layer.silu_mul,
        "argmax": sampling.argmax,
        "softmax_at": sampling.softmax_at,
        "compile": compiled.compile_decoder,
        "quantize": quant.quantize_weights,  # int8 / W8A8 weights for drafts (quant.QUANT_MODES)
    }
