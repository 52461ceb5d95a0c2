"""``nki.language``: dtypes, buffers, allocation, loops, SPMD ids and the tile-level math of the
subset. The math functions return a new SBUF (or PSUM) tile and are built from ``nki.isa``
instructions, so they are counted and rule-checked the same way."""

from __future__ import annotations

import numpy as np

from . import isa
from .context import current
from .dtypes import (  # noqa: F401 - API
    as_dtype,
    bfloat16,
    bool_,
    float8_e4m3,
    float8_e4m3fn,
    float8_e5m2,
    float8_e8m0fnu,
    float16,
    float32,
    int8,
    int16,
    int32,
    uint8,
    uint16,
    uint32,
)
from .errors import NKIError
from .ops import *  # noqa: F401, F403 - the operators (ops.ALL) are part of nki.language
from .ops import MathOp, add, copy, multiply, reciprocal
from .tensor import HBM, PSUM, SBUF, Tensor

NkiTensor = Tensor  # the type of every tensor a kernel handles


class NKIObject:
    """Base class of kernel-side configuration objects (plain Python objects to the interpreter;
    dataclass subclasses, frozen or not, build as usual)."""

    def __init__(self, **kwargs) -> None:
        for k, v in kwargs.items():
            setattr(self, k, v)

sbuf = SBUF
psum = PSUM
hbm = HBM
shared_hbm = "shared_hbm"
private_hbm = "private_hbm"


class _TileSize:
    """``nl.tile_size``: hardware tile limits. The SBUF ones follow the target of the running
    kernel (outside a kernel, e.g. at import, the default target): trn2 224 KiB, trn3 256 KiB per
    partition (AWS's Trainium2/3 architecture guides)."""

    pmax = 128
    psum_fmax = 512  # deprecated alias of psum_bank_fmax
    psum_bank_fmax = 512
    psum_bank_fmax_bytes = 2048
    psum_num_banks = 8
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    bn_stats_fmax = 512

    @property
    def sbuf_fmax_bytes(self) -> int:
        from .context import TARGETS

        return TARGETS[isa.target_name()].sbuf_partition_bytes

    @property
    def total_available_sbuf_size(self) -> int:  # deprecated: per partition, despite the name
        return self.sbuf_fmax_bytes

    @property
    def sbuf_fmax(self) -> int:
        return self.sbuf_fmax_bytes // 4

    @property
    def sbuf_size_bytes(self) -> int:
        return self.pmax * self.sbuf_fmax_bytes


tile_size = _TileSize()


def is_hbm(buffer) -> bool:
    return buffer in (HBM, shared_hbm, private_hbm)


def is_sbuf(buffer) -> bool:
    return buffer == SBUF


def is_psum(buffer) -> bool:
    return buffer == PSUM


def is_on_chip(buffer) -> bool:
    return buffer in (SBUF, PSUM)


# ---- allocation -----------------------------------------------------------------------------


def ndarray(shape, dtype, buffer=None, name: str = "", **_ignored) -> Tensor:
    """A fresh tensor. On-chip ones are NaN/sentinel-filled (rule 9) and hold their SBUF/PSUM
    space while the kernel references them."""
    buffer = SBUF if buffer is None else buffer
    if buffer in (HBM, shared_hbm, private_hbm):
        return current().allocate(shape, dtype, HBM, name, shared=buffer == shared_hbm)
    if buffer not in (SBUF, PSUM):
        raise NKIError(f"unknown buffer {buffer!r}; use nl.sbuf, nl.psum, nl.hbm or nl.shared_hbm")
    return current().allocate(shape, dtype, buffer, name)


def full(shape, fill_value, dtype, buffer=None, name: str = "") -> Tensor:
    t = ndarray(shape, dtype, buffer, name)
    if t.buffer == HBM:
        current().store(t, t.resolve(None), np.full(t.shape, fill_value))
    else:
        isa.memset(t, fill_value)
    return t


def zeros(shape, dtype, buffer=None, name: str = "") -> Tensor:
    return full(shape, 0, dtype, buffer, name)


def ones(shape, dtype, buffer=None, name: str = "") -> Tensor:
    return full(shape, 1, dtype, buffer, name)


def zeros_like(x: Tensor, dtype=None, buffer=None, name: str = "") -> Tensor:
    return zeros(x.shape, dtype or x.dtype, buffer or _buffer_of(x), name)


def empty_like(x: Tensor, dtype=None, buffer=None, name: str = "") -> Tensor:
    return ndarray(x.shape, dtype or x.dtype, buffer or _buffer_of(x), name)


def _buffer_of(x: Tensor) -> str:
    return shared_hbm if x.buffer == HBM else x.buffer


def ds(start, size) -> slice:
    """A dynamic-slice-style ``start:start+size`` (compile-time integers)."""
    return slice(start, start + size)


# ---- loops ----------------------------------------------------------------------------------
# (loops.py: static_range, and its deprecated aliases affine_range and sequential_range, run in
# order as Python's range; fori_loop / while_loop / dynamic_range take runtime bounds)
from .loops import affine_range, dynamic_range, fori_loop, sequential_range, static_range, while_loop  # noqa: E402, F401


# ---- SPMD -----------------------------------------------------------------------------------


def program_id(axis: int = 0) -> int:
    ctx = current()
    if not 0 <= axis < len(ctx.grid):
        raise NKIError(f"program_id({axis}): the kernel was launched with grid {list(ctx.grid)}")
    return ctx.program_id[axis]


def num_programs(axes=None) -> int:
    ctx = current()
    if axes is None:
        return int(np.prod(ctx.grid)) if ctx.grid else 1
    if not 0 <= axes < len(ctx.grid):
        raise NKIError(f"num_programs({axes}): the kernel was launched with grid {list(ctx.grid)}")
    return ctx.grid[axes]


def program_ndim() -> int:
    return len(current().grid)


# ---- data movement --------------------------------------------------------------------------


def load(src: Tensor, dtype=None) -> Tensor:
    """HBM -> a new SBUF tile of the same shape (one DMA)."""
    tile = ndarray(src.shape, src.dtype, SBUF)
    isa.dma_copy(tile, src)
    if dtype is not None and as_dtype(dtype) != src.dtype:
        converted = ndarray(src.shape, dtype, SBUF)
        isa.tensor_copy(converted, tile)
        return converted
    return tile


def store(dst: Tensor, value: Tensor) -> None:
    """An on-chip tile -> HBM (one DMA; converted first if the dtypes differ)."""
    if value.dtype != dst.dtype:
        converted = ndarray(value.shape, dst.dtype, SBUF)
        isa.tensor_copy(converted, value)
        value = converted
    isa.dma_copy(dst, value)


# ---- tile math ------------------------------------------------------------------------------


def call_op(op: MathOp, *args, dtype=None, **kwargs) -> Tensor:
    """The high-level form of an operator: a new SBUF tile holding the result."""
    if op.reduce is not None and op.binary is None:  # nl.max / nl.sum
        return _reduce(op, *args, dtype=dtype, **kwargs)
    if op.unary is not None:
        (x,) = args
        dst = ndarray(x.shape, dtype or x.dtype, SBUF)
        if op is reciprocal:
            isa.reciprocal(dst, x)
        elif op is copy:  # NKI 0.6: a Vector-engine copy, bit-exact when the dtypes match
            isa.tensor_copy(dst, x)
        elif op.bitvec or op.name == "logical_not":
            isa.tensor_scalar(dst, x, op, 0)
        else:
            isa.activation(dst, op, x)
        return dst
    x, y = args
    if not isinstance(x, Tensor):  # number <op> tile
        dst = ndarray(y.shape, dtype or y.dtype, SBUF)
        isa.tensor_scalar(dst, y, op, x, reverse0=True)
        return dst
    dst = ndarray(x.shape, dtype or x.dtype, SBUF)
    if isinstance(y, Tensor) and y.shape == x.shape:
        isa.tensor_tensor(dst, x, y, op)
    else:
        isa.tensor_scalar(dst, x, op, y)
    return dst


def _reduce(op: MathOp, x: Tensor, axis, keepdims: bool = False, dtype=None) -> Tensor:
    axes = isa._reduce_axes(f"nl.{op.name}", x, axis)
    kept = [1 if d in axes else n for d, n in enumerate(x.shape)]
    shape = kept if keepdims or len(x.shape) - len(axes) < 2 else [n for d, n in enumerate(x.shape) if d not in axes]
    dst = ndarray(shape, dtype or x.dtype, SBUF)
    isa.tensor_reduce(dst, op, x, axes, keepdims=True)
    return dst


def mean(x: Tensor, axis, dtype=None, keepdims: bool = False) -> Tensor:
    """The average along free axes: a sum, then a multiply by 1/n."""
    total = _reduce(add, x, axis, keepdims=keepdims, dtype=float32)
    n = int(np.prod([x.shape[a] for a in isa._reduce_axes("nl.mean", x, axis)]))
    dst = ndarray(total.shape, dtype or x.dtype, SBUF)
    isa.tensor_scalar(dst, total, multiply, 1.0 / n)
    return dst


def where(condition: Tensor, x, y, dtype=None) -> Tensor:
    """Element-wise select: x where condition is non-zero, else y (tiles or numbers)."""
    ctx = current()
    ctx.count("vector", "where")
    c = ctx.read(condition, "where", "condition").astype(bool)
    vals = [ctx.read(v, "where", r).astype(np.float32) if isinstance(v, Tensor) else np.float32(v) for v, r in ((x, "x"), (y, "y"))]
    like = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else condition
    dst = ndarray(condition.shape, dtype or like.dtype, SBUF)
    ctx.write(dst, np.where(c, *vals), "where")
    return dst


def transpose(x: Tensor, dtype=None) -> Tensor:
    """x[P, F] -> a PSUM tile [F, P] through the tensor engine (rule 7: at most 128 x 128)."""
    dst = ndarray((isa._free(x), x.shape[0]), dtype or x.dtype, PSUM)
    isa.nc_transpose(dst, x)
    return dst


def matmul(x: Tensor, y: Tensor, transpose_x: bool = False) -> Tensor:
    """x @ y into a float32 PSUM tile. ``transpose_x=True`` means x is given as [K, M] already;
    otherwise x [M, K] is first transposed on the tensor engine (what the compiler inserts)."""
    stationary = x
    if not transpose_x:
        xt = transpose(x)
        stationary = ndarray(xt.shape, x.dtype, SBUF)
        isa.tensor_copy(stationary, xt)
    dst = ndarray((isa._free(stationary), isa._free(y)), float32, PSUM)
    isa.nc_matmul(dst, stationary, y)
    return dst
