"""``nki.isa`` (NKI 0.6) Vector and GpSimd engine instructions beyond the element-wise ones:
fused tensor-scalar-tensor math, predicated copies, selects, scans, partition shuffles and top-8.

Each follows the semantics and constraints of AWS's NKI API reference; a constraint there that
is not one of the twelve numbered rules raises :class:`NKIError` naming the constraint.
"""

from __future__ import annotations

import numpy as np

from . import dtypes
from . import ops as _ops
from .context import current
from .errors import NKIError
from .isa_common import (
    apply_op,
    arith,
    check_partitions,
    f32,
    fold_free,
    free,
    math_op,
    not_both_psum,
    reduce_into_registers,
    same_layout,
    scalar_operand,
    store_where,
)
from .isa_enums import reduce_cmd, target_name
from .tensor import SBUF, Tensor

_CMD = reduce_cmd
FP32_MIN = float(np.finfo(np.float32).min)
_COMPARISONS = ("equal", "less", "less_equal", "greater", "greater_equal")


def _arith_op(op, what: str):
    op = math_op(op, "binary", what)
    if op.bitvec:
        raise NKIError(f"{what}: {op!r} is a bitvec operator; only arithmetic operators are supported")
    return op


def _column(ctx, v, P: int, op: str, role: str) -> np.ndarray:
    """A number or a [P, 1] tile as a float32 [P] column."""
    if isinstance(v, Tensor):
        if tuple(v.shape) != (P, 1):
            raise NKIError(f"{op}: {role} must be a number or a [{P}, 1] tile, got {list(v.shape)}")
        return f32(ctx.read(v, op, role)).astype(np.float32).reshape(P)
    return np.full(P, scalar_operand(ctx, v, None, op, role), np.float32)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):  # noqa: ARG001
    """dst = (data op0 operand0) op1 operand1: operand0 a number or [P, 1] tile, operand1 a tile like data."""
    ctx = current()
    ctx.count("vector", "scalar_tensor_tensor")
    op0, op1 = _arith_op(op0, "scalar_tensor_tensor op0"), _arith_op(op1, "scalar_tensor_tensor op1")
    check_partitions("scalar_tensor_tensor", dst, data, operand1)
    if not isinstance(operand1, Tensor):
        raise NKIError("scalar_tensor_tensor: operand1 must be a tile with data's shape")
    same_layout("scalar_tensor_tensor", dst, data, "data")
    same_layout("scalar_tensor_tensor", data, operand1, "operand1")
    not_both_psum("scalar_tensor_tensor", data, operand1, "data and operand1")
    x = f32(ctx.read(data, "scalar_tensor_tensor", "data")).astype(np.float32)
    v0 = scalar_operand(ctx, operand0, data, "scalar_tensor_tensor", "operand0")
    v1 = f32(ctx.read(operand1, "scalar_tensor_tensor", "operand1")).astype(np.float32).reshape(data.shape)
    ctx.write(dst, apply_op(op1, apply_op(op0, x, v0, reverse0), v1, reverse1), "scalar_tensor_tensor")


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):  # noqa: ARG001
    """dst = src where predicate != 0 (== 0 with reverse_pred); other dst elements keep their values."""
    ctx = current()
    ctx.count("vector", "tensor_copy_predicated")
    check_partitions("tensor_copy_predicated", dst, src, predicate)
    if predicate.dtype not in (dtypes.uint8, dtypes.uint16, dtypes.uint32, dtypes.bool_):
        raise NKIError(f"tensor_copy_predicated: predicate must be uint8, uint16 or uint32, got {predicate.dtype}")
    same_layout("tensor_copy_predicated", dst, predicate, "predicate")
    if isinstance(src, Tensor):
        same_layout("tensor_copy_predicated", dst, src)
        if src.dtype != dst.dtype:
            raise NKIError(f"tensor_copy_predicated: src {src.dtype} and dst {dst.dtype} must share a dtype")
        not_both_psum("tensor_copy_predicated", src, predicate, "src and predicate")
        values = ctx.read(src, "tensor_copy_predicated", "src").reshape(dst.shape)
    else:
        values = np.asarray(scalar_operand(ctx, src, dst, "tensor_copy_predicated", "src"))
    mask = ctx.read(predicate, "tensor_copy_predicated", "predicate").reshape(dst.shape) != 0
    mask = ~mask if reverse_pred else mask
    sel = ctx.operand(dst, "tensor_copy_predicated", "dst", mode="w")
    store_where(ctx, dst, sel, mask, values)


def tensor_scalar_reduce(dst, data, op0, operand0, reduce_op, reduce_res=None, reverse0=False,
                         reduce_cmd=_CMD.reset_reduce, reduce_init=None, reduce_res_negate=False, name=None):  # noqa: ARG001
    """dst = data op0 operand0; its reduction along the free axes (reduce_op: add, multiply, max,
    min) folds into the Vector Engine's reduce registers as ``reduce_cmd`` says; ``reduce_res``
    [P, 1] (optional) receives them, negated with ``reduce_res_negate``."""
    ctx = current()
    ctx.count("vector", "tensor_scalar_reduce")
    if reverse0:
        raise NKIError("tensor_scalar_reduce: reverse0 is not supported (NKI 0.6)")
    if not isinstance(op0, _ops.MathOp) or op0.bitvec:
        raise NKIError(f"tensor_scalar_reduce: op0 must be an arithmetic operator, got {op0!r}")
    if reduce_cmd not in (_CMD.reset_reduce, _CMD.reduce, _CMD.load_reduce):
        raise NKIError(f"tensor_scalar_reduce: reduce_cmd must be reset_reduce, reduce or load_reduce, got {reduce_cmd}")
    check_partitions("tensor_scalar_reduce", dst, data)
    same_layout("tensor_scalar_reduce", dst, data, "data")
    P = data.shape[0]
    x = arith(ctx.read(data, "tensor_scalar_reduce", "data"), op0)
    v = None if op0.binary is None and operand0 in (None, 0) else scalar_operand(ctx, operand0, data, "tensor_scalar_reduce", "operand0")
    y = np.asarray(apply_op(op0, x, v), dtype=np.float32)
    ctx.write(dst, y, "tensor_scalar_reduce")
    init = None if reduce_init is None else _column(ctx, reduce_init, P, "tensor_scalar_reduce", "reduce_init")
    regs = reduce_into_registers(ctx, "vector", "tensor_scalar_reduce", reduce_op, fold_free(reduce_op, y), reduce_cmd, init)
    if reduce_res is not None:
        if tuple(reduce_res.shape) != (P, 1):
            raise NKIError(f"tensor_scalar_reduce: reduce_res must be [{P}, 1], got {list(reduce_res.shape)}")
        ctx.write(reduce_res, (-regs if reduce_res_negate else regs).reshape(P, 1), "tensor_scalar_reduce", "reduce_res")


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):  # noqa: ARG001
    """Per partition, along the flattened free axis: r[i] = op1(op0(data0[i], r[i-1]), data1[i]),
    r[-1] = initial (a number or a [P, 1] tile). reverse0 makes data0 op0's rhs; reverse1 makes
    data1 op1's lhs."""
    ctx = current()
    ctx.count("vector", "tensor_tensor_scan")
    op0, op1 = _arith_op(op0, "tensor_tensor_scan op0"), _arith_op(op1, "tensor_tensor_scan op1")
    check_partitions("tensor_tensor_scan", dst, data0, data1)
    same_layout("tensor_tensor_scan", dst, data0, "data0")
    same_layout("tensor_tensor_scan", data0, data1, "data1")
    not_both_psum("tensor_tensor_scan", data0, data1, "data0 and data1")
    P = data0.shape[0]
    a = f32(ctx.read(data0, "tensor_tensor_scan", "data0")).astype(np.float32).reshape(P, -1)
    b = f32(ctx.read(data1, "tensor_tensor_scan", "data1")).astype(np.float32).reshape(P, -1)
    prev = _column(ctx, initial, P, "tensor_tensor_scan", "initial")
    out = np.empty_like(a)
    for i in range(a.shape[1]):
        t = apply_op(op0, prev, a[:, i], reverse=not reverse0)  # op0(data0, prev), or op0(prev, data0)
        prev = np.asarray(apply_op(op1, t, b[:, i], reverse1), dtype=np.float32)
        out[:, i] = prev
    ctx.write(dst, out, "tensor_tensor_scan")


def range_select(dst, on_true_tile, comp_op0, comp_op1, bound0, bound1, reduce_cmd=_CMD.reset_reduce, reduce_res=None,
                 reduce_op=_ops.maximum, range_start=0, on_false_value=FP32_MIN, name=None):  # noqa: ARG001
    """dst[p, i] = on_true_tile[p, i] where comp_op0(range_start + i, bound0[p]) and
    comp_op1(range_start + i, bound1[p]), else on_false_value (FP32_MIN); i runs over the
    flattened free axis. The row maximum folds into the Vector Engine's reduce registers."""
    ctx = current()
    ctx.count("vector", "range_select")
    if target_name() == "trn1":
        raise NKIError("range_select needs NeuronCore-v3 or newer (trn2, trn3)")
    for role, op in (("comp_op0", comp_op0), ("comp_op1", comp_op1)):
        if not isinstance(op, _ops.MathOp) or op.name not in _COMPARISONS:
            raise NKIError(f"range_select: {role} must be one of nl.{', nl.'.join(_COMPARISONS)}, got {op!r}")
    if not isinstance(reduce_op, _ops.MathOp) or reduce_op.name not in ("maximum", "max"):
        raise NKIError(f"range_select: reduce_op must be nl.maximum, got {reduce_op!r}")
    if on_false_value is Ellipsis:
        on_false_value = FP32_MIN
    if float(on_false_value) != FP32_MIN:
        raise NKIError(f"range_select: on_false_value must be FP32_MIN (-3.4028235e+38), got {on_false_value}")
    if not dtypes.is_float(on_true_tile.dtype):
        raise NKIError(f"range_select: on_true_tile must hold floats, got {on_true_tile.dtype}")
    P = on_true_tile.shape[0]
    for role, t in (("bound0", bound0), ("bound1", bound1)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (P, 1) or t.dtype != dtypes.float32:
            raise NKIError(f"range_select: {role} must be a float32 [{P}, 1] tile")
    check_partitions("range_select", dst, on_true_tile)
    same_layout("range_select", dst, on_true_tile, "on_true_tile")
    x = f32(ctx.read(on_true_tile, "range_select", "on_true_tile")).astype(np.float32).reshape(P, -1)
    idx = (np.float32(range_start) + np.arange(x.shape[1], dtype=np.float32))[None, :]
    b0 = _column(ctx, bound0, P, "range_select", "bound0")[:, None]
    b1 = _column(ctx, bound1, P, "range_select", "bound1")[:, None]
    mask = (comp_op0.binary(idx, b0) != 0) & (comp_op1.binary(idx, b1) != 0)
    y = np.where(mask, x, np.float32(FP32_MIN))
    ctx.write(dst, y, "range_select")
    regs = reduce_into_registers(ctx, "vector", "range_select", reduce_op, y.max(axis=1), reduce_cmd)
    if reduce_res is not None:
        if tuple(reduce_res.shape) != (P, 1):
            raise NKIError(f"range_select: reduce_res must be [{P}, 1], got {list(reduce_res.shape)}")
        ctx.write(reduce_res, regs.reshape(P, 1), "range_select", "reduce_res")


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=_ops.equal, offset=0,
                  name=None):  # noqa: ARG001
    """GpSimd: v = offset + p * channel_multiplier + sum_k i_k * step_k over ``pattern``
    ([[step, count], ...], up to 4 entries, row-major over each partition's free elements);
    dst = on_true_tile where cmp_op(v, 0), else on_false_value. Both tiles in SBUF."""
    ctx = current()
    ctx.count("gpsimd", "affine_select")
    if not isinstance(cmp_op, _ops.MathOp) or cmp_op.binary is None:
        raise NKIError(f"affine_select: cmp_op must be a comparison operator, got {cmp_op!r}")
    for role, t in (("dst", dst), ("on_true_tile", on_true_tile)):
        if t.buffer != SBUF:
            raise NKIError(f"affine_select: {role} must be in SBUF, got {t.describe()}")
    check_partitions("affine_select", dst, on_true_tile)
    same_layout("affine_select", dst, on_true_tile, "on_true_tile")
    P = dst.shape[0]
    v = _affine(pattern, P, offset, channel_multiplier, free(dst), "affine_select")
    x = f32(ctx.read(on_true_tile, "affine_select", "on_true_tile")).astype(np.float32).reshape(P, -1)
    keep = cmp_op.binary(v.astype(np.float32), np.float32(0)) != 0
    ctx.write(dst, np.where(keep, x, np.float32(on_false_value)), "affine_select")


def _affine(pattern, P: int, offset, channel_multiplier, n_free: int, op: str) -> np.ndarray:
    try:
        pat = [(int(s), int(c)) for s, c in pattern]
    except (TypeError, ValueError):
        raise NKIError(f"{op}: pattern must be a list of [step, count] pairs, got {pattern!r}") from None
    if not 1 <= len(pat) <= 4 or any(c < 1 for _, c in pat):
        raise NKIError(f"{op}: pattern must have 1 to 4 [step, count] entries with counts >= 1, got {pattern!r}")
    counts = [c for _, c in pat]
    if int(np.prod(counts)) != n_free:
        raise NKIError(f"{op}: the pattern covers {int(np.prod(counts))} elements per partition, the tiles {n_free}")
    v = np.full([P] + counts, int(offset), dtype=np.int64)
    v += (np.arange(P, dtype=np.int64) * int(channel_multiplier)).reshape((P,) + (1,) * len(counts))
    for k, (step, count) in enumerate(pat):
        v += (np.arange(count, dtype=np.int64) * step).reshape((count,) + (1,) * (len(counts) - k - 1))
    return v.reshape(P, -1)


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):  # noqa: ARG001
    """Within each quadrant of 32 partitions: dst[i] = src[shuffle_mask[i]]; 255 leaves dst[i] as it is."""
    ctx = current()
    ctx.count("vector", "nc_stream_shuffle")
    mask = [int(m) for m in shuffle_mask]
    if len(mask) != 32 or any(not (0 <= m < 32 or m == 255) for m in mask):
        raise NKIError(f"nc_stream_shuffle: shuffle_mask must be 32 entries in [0, 32) or 255, got {shuffle_mask!r}")
    if dst.dtype != src.dtype:
        raise NKIError(f"nc_stream_shuffle: dst {dst.dtype} and src {src.dtype} must share a dtype")
    if free(dst) != free(src):
        raise NKIError(f"nc_stream_shuffle: dst and src need the same elements per partition ({free(dst)} vs {free(src)})")
    check_partitions("nc_stream_shuffle", dst, src)
    Ps, Pd = src.shape[0], dst.shape[0]
    active = -(-max(Ps, Pd) // 32) * 32
    starts = {128: (0,), 96: (0,), 64: (0, 64), 32: (0, 32, 64, 96)}[active]
    for role, t in (("src", src), ("dst", dst)):
        first = t._layout().offset // (t.alloc.data.size // t.alloc.data.shape[0])  # start partition
        if first not in starts:
            raise NKIError(f"nc_stream_shuffle: {role} starts at partition {first}; with {active} active partitions "
                           f"it must start at one of {list(starts)}")
    x = ctx.read(src, "nc_stream_shuffle", "src").reshape(Ps, -1)
    rows, picks = [], []
    for p in range(Pd):
        m = mask[p % 32]
        if m == 255:
            continue
        q = (p // 32) * 32 + m
        if q >= Ps:
            raise NKIError(f"nc_stream_shuffle: dst partition {p} reads src partition {q}, past src's {Ps}")
        rows.append(p), picks.append(q)
    sel = ctx.operand(dst, "nc_stream_shuffle", "dst", mode="w")
    keep = np.zeros(Pd, bool)
    keep[rows] = True
    values = np.zeros((Pd, x.shape[1]), x.dtype)
    values[rows] = x[picks]
    store_where(ctx, dst, sel, keep.reshape((Pd,) + (1,) * (dst.ndim - 1)), values.reshape(dst.shape))


def _eight(op: str, dst, src, role: str) -> int:
    n = free(src)
    if not 8 <= n <= 16384:
        raise NKIError(f"{op}: {role} must have 8 to 16384 elements per partition, got {n}")
    if len(src.shape) > 3:
        raise NKIError(f"{op}: {role} is at most 3-D, got {list(src.shape)}")
    if tuple(dst.shape) != (src.shape[0], 8):
        raise NKIError(f"{op}: dst must be [{src.shape[0]}, 8], got {list(dst.shape)}")
    check_partitions(op, dst, src)
    return n


def max8(dst, src, name=None):  # noqa: ARG001
    """dst[p, :] = the 8 largest values of partition p of src, in descending order."""
    ctx = current()
    ctx.count("vector", "max8")
    _eight("max8", dst, src, "src")
    x = f32(ctx.read(src, "max8", "src")).astype(np.float32).reshape(src.shape[0], -1)
    ctx.write(dst, -np.sort(-x, axis=1)[:, :8], "max8")


def nc_find_index8(dst, data, vals, name=None):  # noqa: ARG001
    """dst[p, k] = index of the first occurrence of vals[p, k] in partition p of data; a repeated
    value takes the next occurrence; a value not found gives all ones (0xFFFF / 0xFFFFFFFF)."""
    ctx = current()
    ctx.count("vector", "nc_find_index8")
    _eight("nc_find_index8", dst, data, "data")
    if free(vals) != 8 or vals.shape[0] != data.shape[0]:
        raise NKIError(f"nc_find_index8: vals must hold 8 values per partition, got {list(vals.shape)}")
    if dst.dtype not in (dtypes.uint16, dtypes.uint32):
        raise NKIError(f"nc_find_index8: dst must be uint16 or uint32, got {dst.dtype}")
    x = f32(ctx.read(data, "nc_find_index8", "data")).astype(np.float32).reshape(data.shape[0], -1)
    v = f32(ctx.read(vals, "nc_find_index8", "vals")).astype(np.float32).reshape(data.shape[0], 8)
    out = np.full((data.shape[0], 8), np.iinfo(dst.dtype).max, dtype=np.int64)
    for p in range(x.shape[0]):
        used: dict[float, int] = {}
        for k in range(8):
            hits = np.flatnonzero(x[p] == v[p, k])
            nth = used.get(float(v[p, k]), 0)
            if nth < hits.size:
                out[p, k] = hits[nth]
                used[float(v[p, k])] = nth + 1
    ctx.write(dst, out, "nc_find_index8")
