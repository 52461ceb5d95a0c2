"""Vocabulary-wide reductions in one native call each (sampling.c): greedy decoding's argmax (the
lowest index of each row's maximum, as ``torch.argmax`` picks it, with a NaN check in the same
pass) and the drafting gate's confidence (the softmax probability of one id per row)."""

from __future__ import annotations

import torch

from .build import get_lib


def _lib_for(logits: torch.Tensor):
    """The native library, or None where it is unavailable or ``logits`` [..., V] do not fit its
    kernels (CPU, fp32/bf16, 0 < V < 2**31, no autograd)."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16) or logits.dim() == 0:
        return None
    if not 0 < logits.shape[-1] < 2**31 or logits.requires_grad:
        return None
    return get_lib()


def argmax(logits: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(ids [...] int64, whether any row holds a NaN) for CPU fp32/bf16 ``logits`` [..., V], or
    None where the native kernels are unavailable or the tensor does not fit (the caller then uses
    torch). Rows holding a NaN get id -1."""
    lib = _lib_for(logits)
    if lib is None:
        return None
    V = logits.shape[-1]
    x = logits.contiguous()
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    n_nan = lib.verispec_argmax(x.data_ptr(), x.numel() // V, V, int(x.dtype == torch.bfloat16), out.data_ptr(),
                                torch.get_num_threads())
    return out, n_nan > 0


def softmax_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """[R] fp32: softmax(``logits`` [R, V], temperature 1)[r, ids[r]] on CPU fp32/bf16 logits, or
    None where the native kernels are unavailable, the tensors do not fit, or a row's maximum is
    not finite (the caller then uses torch, keeping its conventions for infinities and NaN)."""
    lib = _lib_for(logits)
    if lib is None or logits.dim() != 2 or ids.shape != logits.shape[:1]:
        return None
    R, V = logits.shape
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if R and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise IndexError(f"softmax_at: ids must lie in [0, {V}), got {ids.tolist()}")
    x = logits.contiguous()
    out = torch.empty(R, dtype=torch.float32)
    bad = lib.verispec_softmax_at(x.data_ptr(), R, V, int(x.dtype == torch.bfloat16), ids.data_ptr(), out.data_ptr())
    return None if bad else out
