"""Skinny matrix products (gemv.c) for decode, and a Linear that uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import build_error, get_lib

MAX_M = 16  # rows per native call (gemv.c's MAX_M); more rows are split

def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and weight.is_contiguous()
        and not x.requires_grad
        and not weight.requires_grad
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_f32: bool = False, tiles: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K] with few rows, via gemv.c when it applies.
    ``out_f32``: return ``F.linear(...).float()``; for bf16 the native product writes each bf16
    result widened to fp32 itself (the same values, one pass fewer over e.g. 151936 logits).
    ``tiles``: bf16 products on AMX tiles (the caller checked :func:`tiles_available`): the
    same per-row independence of M, other roundings than the vector kernel's."""
    lib = get_lib()
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if lib is None or rows == 0 or rows > 4 * MAX_M or not _fits(x, weight, bias):
        y = F.linear(x, weight, bias)
        return y.float() if out_f32 else y
    N = weight.shape[0]
    x2 = x if x.is_contiguous() else x.contiguous()  # [..., K] read as [M, K]
    widen = out_f32 and x.dtype == torch.bfloat16
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32 if widen else x.dtype)  # [..., N] written as [M, N]
    if x.dtype != torch.bfloat16:
        fn = lib.verispec_gemv_f32
    elif tiles:
        fn = lib.verispec_gemv_bf16_tiles_f32out if widen else lib.verispec_gemv_bf16_tiles
    else:
        fn = lib.verispec_gemv_bf16_f32out if widen else lib.verispec_gemv_bf16
    b = bias.contiguous().data_ptr() if bias is not None else None
    nt = torch.get_num_threads()
    size, ysize = x.element_size(), y.element_size()
    xp, yp, wp = x2.data_ptr(), y.data_ptr(), weight.data_ptr()
    for m0 in range(0, rows, MAX_M):  # pointer arithmetic, not row views: this runs ~200 times a token
        fn(xp + m0 * K * size, wp, b, yp + m0 * N * ysize, min(MAX_M, rows - m0), K, N, nt)
    return y


def stream_read(buf: torch.Tensor) -> float:
    """Read every float of ``buf`` (fp32, contiguous, CPU) with the native streaming kernel;
    return their sum. For bandwidth measurement; raises if the native library is unavailable."""
    lib = get_lib()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {build_error()}")
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError("stream_read needs a contiguous fp32 CPU tensor")
    return lib.verispec_stream_read(buf.data_ptr(), buf.numel(), torch.get_num_threads())


class SkinnyLinear(nn.Linear):
    """An nn.Linear whose few-row products go through gemv.c (larger ones through torch)."""

    tiles = False  # TileLinear: bf16 products on AMX tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias, tiles=self.tiles)

    def forward_f32(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x).float()`` in one pass (the decoder's logits)."""
        return skinny_linear(x, self.weight, self.bias, out_f32=True, tiles=self.tiles)


class TileLinear(SkinnyLinear):
    """A SkinnyLinear whose bf16 few-row products run on AMX tiles (models loaded with amx=True)."""

    tiles = True


def tile_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`skinny_linear` on AMX tiles: the product of tensor-parallel layers in amx=True models."""
    return skinny_linear(x, weight, bias, tiles=True)
