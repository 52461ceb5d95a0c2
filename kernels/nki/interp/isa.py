"""``nki.isa``: the instructions of the subset, NKI 0.3 dialect (``dst`` first, nothing returned).

Every instruction counts itself on its engine; compute instructions read and write only SBUF
and PSUM (rule 5) and compute in float32, their results rounded to the destination dtype.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .context import current
from .errors import NKIError, NKIRuleError
from .ops import MathOp
from .tensor import HBM, PSUM, SBUF, Tensor


class oob_mode:  # noqa: N801 - NKI's enum name
    error = "error"
    skip = "skip"


class engine:  # noqa: N801 - NKI's enum name
    unknown = None
    tensor = "tensor"
    vector = "vector"
    scalar = "scalar"
    gpsimd = "gpsimd"


def _engine(requested, default: str) -> str:
    if requested in (None, engine.unknown):
        return default
    if requested not in ("tensor", "vector", "scalar", "gpsimd"):
        raise NKIError(f"unknown engine {requested!r}")
    return requested


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x


def _free(t: Tensor) -> int:
    return math.prod(t.shape[1:])


def _same_layout(op: str, dst: Tensor, src: Tensor, role: str = "src") -> None:
    if dst.shape[0] != src.shape[0] or _free(dst) != _free(src):
        raise NKIError(
            f"{op}: dst {list(dst.shape)} and {role} {list(src.shape)} need the same partitions and elements per partition"
        )


def _math(op, kind: str, what: str) -> MathOp:
    if not isinstance(op, MathOp) or getattr(op, kind) is None:
        raise NKIError(f"{what}: {op!r} is not a {kind} operator")
    return op


def _scalar_operand(ctx, operand, data: Tensor, op: str, role: str):
    """A compile-time float, or an on-chip [P, 1] tile broadcast along the free axes."""
    if isinstance(operand, Tensor):
        if operand.shape != (data.shape[0], 1):
            raise NKIError(f"{op}: {role} must be a scalar or a [{data.shape[0]}, 1] tile, got {list(operand.shape)}")
        v = _f32(ctx.read(operand, op, role))
        return v.reshape((data.shape[0],) + (1,) * (len(data.shape) - 1))
    if isinstance(operand, (bool, np.bool_)) or not isinstance(operand, (int, float, np.integer, np.floating)):
        raise NKIError(f"{op}: {role} must be a number or a tile, got {type(operand).__name__}")
    return np.float32(operand)


# ---- data movement --------------------------------------------------------------------------


def dma_copy(dst, src, oob_mode=oob_mode.error, dge_mode=None, name=None):  # noqa: ARG001 - API parity
    """Copy ``src`` to ``dst`` (HBM or on-chip) with the DMA engines; element order is row-major."""
    ctx = current()
    ctx.count("dma", "dma_copy")
    for role, t in (("dst", dst), ("src", src)):
        if not isinstance(t, Tensor):
            raise NKIError(f"dma_copy: {role} must be an NKI tensor, got {type(t).__name__}")
    if dst.dtype != src.dtype:
        raise NKIError(f"dma_copy: dtypes differ (dst {dst.dtype}, src {src.dtype}); DMA does not convert")
    if math.prod(dst.shape) != math.prod(src.shape):
        raise NKIError(f"dma_copy: dst {list(dst.shape)} and src {list(src.shape)} hold different element counts")
    s = ctx.operand(src, "dma_copy", "src", on_chip=False, allow_oob=True)
    d = ctx.operand(dst, "dma_copy", "dst", mode="w", on_chip=False, allow_oob=True)
    if s.all_valid and d.all_valid:
        values = s.get(src.alloc.data)
        ctx.store(dst, d, values)
        moved = values.size
    else:
        if oob_mode != "skip":
            side, t, sel = ("src", src, s) if not s.all_valid else ("dst", dst, d)
            bad = int((~sel.valid).sum())
            raise NKIRuleError(
                12, f"dma_copy {side} {t.describe()}: {bad} element(s) out of bounds of the tensor "
                "(pass oob_mode=oob_mode.skip to drop them)"
            )
        sv = np.ones(s.shape, bool) if s.valid is None else s.valid
        dv = np.ones(d.shape, bool) if d.valid is None else d.valid
        ok = sv.reshape(-1) & dv.reshape(-1)
        src_flat = _flat(s, src).reshape(-1)[ok]
        dst_flat = _flat(d, dst).reshape(-1)[ok]
        dst.alloc.data.reshape(-1)[dst_flat] = src.alloc.data.reshape(-1)[src_flat]
        if dst.alloc.written is not None:
            dst.alloc.written.reshape(-1)[dst_flat] = True
        moved = int(ok.sum())
    nbytes = moved * src.dtype.itemsize
    ctx.stats.dma_bytes += nbytes
    if src.buffer == HBM:
        ctx.stats.hbm_read_bytes += nbytes
    if dst.buffer == HBM:
        ctx.stats.hbm_write_bytes += nbytes


def _flat(sel, t: Tensor) -> np.ndarray:
    return sel.flat_indices(t.alloc.data.shape)


def tensor_copy(dst, src, engine=None, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count(_engine(engine, "vector"), "tensor_copy")
    _same_layout("tensor_copy", dst, src)
    ctx.write(dst, ctx.read(src, "tensor_copy", "src"), "tensor_copy")


def memset(dst, value, engine=None, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count(_engine(engine, "vector"), "memset")
    ctx.write(dst, np.full(dst.shape, value, dtype=np.float32 if dtypes.is_float(dst.dtype) else np.int64), "memset")


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):  # noqa: ARG001
    """dst[p, i1, i2, ...] = offset + p * channel_multiplier + sum(i_k * step_k), in int32 math."""
    ctx = current()
    ctx.count("gpsimd", "iota")
    counts = tuple(int(c) for _, c in pattern)
    if (dst.shape[0],) + counts != tuple(dst.shape):
        raise NKIError(f"iota: dst {list(dst.shape)} must be [partitions] + the pattern's counts {list(counts)}")
    vals = np.full(dst.shape, int(offset), dtype=np.int64)
    vals += (np.arange(dst.shape[0], dtype=np.int64) * int(channel_multiplier)).reshape((-1,) + (1,) * len(counts))
    for k, (step, count) in enumerate(pattern):
        vals += (np.arange(int(count), dtype=np.int64) * int(step)).reshape((int(count),) + (1,) * (len(counts) - k - 1))
    ctx.write(dst, vals.astype(np.int32).astype(np.float32) if dtypes.is_float(dst.dtype) else vals.astype(np.int32), "iota")


# ---- tensor engine --------------------------------------------------------------------------


def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              accumulate=None, tile_position=(), tile_size=(), perf_mode=None, name=None):  # noqa: ARG001
    """dst[M, N] (+)= stationary[K, M].T @ moving[K, N] on the tensor engine (rule 4)."""
    ctx = current()
    ctx.count("tensor", "nc_matmul")
    st = ctx.read(stationary, "nc_matmul", "stationary")
    mv = ctx.read(moving, "nc_matmul", "moving")
    for role, t in (("stationary", stationary), ("moving", moving)):
        if t.buffer != SBUF:
            raise NKIRuleError(4, f"{role} {t.describe()} must be in SBUF")
    K, M, N = stationary.shape[0], _free(stationary), _free(moving)
    if moving.shape[0] != K:
        raise NKIRuleError(4, f"contraction (partition) sizes differ: stationary {K}, moving {moving.shape[0]}")
    if M > 128:
        raise NKIRuleError(4, f"stationary free size {M} > 128")
    if N > 512:
        raise NKIRuleError(4, f"moving free size {N} > 512")
    if (stationary.dtype == dtypes.float32) != (moving.dtype == dtypes.float32):
        raise NKIRuleError(4, f"a float32 operand needs a float32 partner (stationary {stationary.dtype}, moving {moving.dtype})")
    if dst.buffer != PSUM or dst.dtype != dtypes.float32 or dst.shape[0] != M or _free(dst) != N:
        raise NKIRuleError(4, f"dst must be a float32 PSUM tile [{M}, {N}], got {dst.describe()} {dst.dtype}")
    result = _f32(st).reshape(K, M).T @ _f32(mv).reshape(K, N)  # [M, N], float32 accumulation
    if accumulate is False:
        ctx.write(dst, result, "nc_matmul")
        return
    # accumulate=True adds to what is there (all of it must have been written); None adds only where written
    sel = ctx.operand(dst, "nc_matmul", "dst", mode="a", must_be_written=bool(accumulate))
    old = sel.get(dst.alloc.data).reshape(M, N)
    seen = sel.get(dst.alloc.written).reshape(M, N) if dst.alloc.written is not None else np.ones((M, N), bool)
    ctx.store(dst, sel, np.where(seen, old + result, result))


def nc_transpose(dst, data, engine=None, name=None):  # noqa: ARG001
    """dst[F, P] = data[P, F]: tensor engine (dst in PSUM, up to 128 x 128) or vector engine (32 x 32)."""
    ctx = current()
    P, F = data.shape[0], _free(data)
    on_pe = dst.buffer == PSUM if engine in (None, "unknown") else engine == "tensor"
    ctx.count("tensor" if on_pe else "vector", "nc_transpose")
    limit = 128 if on_pe else 32
    if P > limit or F > limit:
        where = "tensor engine" if on_pe else "vector engine"
        raise NKIRuleError(7, f"{where} transposes at most {limit} x {limit}, got {P} x {F}")
    if on_pe and dst.buffer != PSUM:
        raise NKIRuleError(7, f"a tensor-engine transpose writes PSUM, got dst {dst.describe()}")
    if dst.shape[0] != F or _free(dst) != P:
        raise NKIError(f"nc_transpose: dst must be [{F}, {P}], got {list(dst.shape)}")
    ctx.write(dst, ctx.read(data, "nc_transpose", "data").reshape(P, F).T, "nc_transpose")


# ---- vector and scalar engines --------------------------------------------------------------


def tensor_tensor(dst, data1, data2, op, engine=None, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count(_engine(engine, "vector"), "tensor_tensor")
    fn = _math(op, "binary", "tensor_tensor").binary
    _same_layout("tensor_tensor", dst, data1, "data1")
    _same_layout("tensor_tensor", dst, data2, "data2")
    a = _f32(ctx.read(data1, "tensor_tensor", "data1")).reshape(dst.shape)
    b = _f32(ctx.read(data2, "tensor_tensor", "data2")).reshape(dst.shape)
    with np.errstate(all="ignore"):
        ctx.write(dst, fn(a, b), "tensor_tensor")


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=None,
                  name=None):  # noqa: ARG001
    """dst = (data op0 operand0) op1 operand1; each operand a number or a [P, 1] tile."""
    ctx = current()
    ctx.count(_engine(engine, "vector"), "tensor_scalar")
    _same_layout("tensor_scalar", dst, data, "data")
    x = _f32(ctx.read(data, "tensor_scalar", "data"))
    stages = [(op0, operand0, reverse0, "operand0")]
    if op1 is not None:
        stages.append((op1, operand1, reverse1, "operand1"))
    elif operand1 is not None:
        raise NKIError("tensor_scalar: operand1 given without op1")
    with np.errstate(all="ignore"):
        for op, operand, reverse, role in stages:
            fn = _math(op, "binary", "tensor_scalar").binary
            v = _scalar_operand(ctx, operand, data, "tensor_scalar", role)
            x = fn(v, x) if reverse else fn(x, v)
    ctx.write(dst, x, "tensor_scalar")


def _reduce_axes(op: str, t: Tensor, axis) -> tuple:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) % len(t.shape) for a in axes))
    if 0 in axes:
        raise NKIRuleError(6, f"{op} over the partition axis (0) of {t.describe()}; reduce along free axes only")
    if axes != tuple(range(len(t.shape) - len(axes), len(t.shape))):
        raise NKIError(f"{op}: reduction axes {list(axes)} must be the last consecutive free axes")
    return axes


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count("vector", "tensor_reduce")
    fn = _math(op, "reduce", "tensor_reduce").reduce
    axes = _reduce_axes("tensor_reduce", data, axis)
    x = _f32(ctx.read(data, "tensor_reduce", "data"))
    with np.errstate(all="ignore"):
        r = fn.reduce(x, axis=axes, keepdims=keepdims)
    r = -r if negate else r
    if dst.shape[0] != data.shape[0] or _free(dst) != r.size // data.shape[0]:
        raise NKIError(f"tensor_reduce: dst {list(dst.shape)} does not hold the result {list(r.shape)}")
    ctx.write(dst, r, "tensor_reduce")


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=None, name=None):  # noqa: ARG001
    """dst = op(data * scale + bias) on the scalar engine; bias/scale tensors are [P, 1] (rule 8).
    With ``reduce_res``, also writes the sum of the result along the free axes there."""
    ctx = current()
    ctx.count("scalar", "activation")
    fn = _math(op, "unary", "activation").unary
    _same_layout("activation", dst, data, "data")
    P = data.shape[0]
    for role, v in (("bias", bias), ("scale", scale)):
        if isinstance(v, Tensor) and v.shape != (P, 1):
            raise NKIRuleError(8, f"{role} must be one value per partition [{P}, 1], got {list(v.shape)}")
    x = _f32(ctx.read(data, "activation", "data"))
    s = _scalar_operand(ctx, scale, data, "activation", "scale")
    b = np.float32(0.0) if bias is None else _scalar_operand(ctx, bias, data, "activation", "bias")
    with np.errstate(all="ignore"):
        y = fn(x * s + b).astype(np.float32)
    ctx.write(dst, y, "activation")
    if reduce_res is not None:
        if reduce_op is None or getattr(reduce_op, "reduce", None) is not np.add:
            raise NKIError("activation: reduce_op must be nl.add when reduce_res is given")
        if reduce_res.shape != (P, 1):
            raise NKIError(f"activation: reduce_res must be [{P}, 1], got {list(reduce_res.shape)}")
        ctx.write(reduce_res, y.reshape(P, -1).sum(axis=1, keepdims=True), "activation", "reduce_res")


def reciprocal(dst, data, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count("vector", "reciprocal")
    _same_layout("reciprocal", dst, data, "data")
    with np.errstate(all="ignore"):
        ctx.write(dst, 1.0 / _f32(ctx.read(data, "reciprocal", "data")), "reciprocal")
