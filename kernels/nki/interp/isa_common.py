"""Helpers shared by the ``nki.isa`` instruction modules: operand shapes, float32 math, operators,
and the per-partition reduce registers of the Vector and Scalar engines."""

from __future__ import annotations

import math
import weakref

import numpy as np

from . import dtypes
from .errors import NKIError, NKIRuleError
from .isa_enums import reduce_cmd
from .ops import MathOp
from .tensor import PMAX, PSUM, Selector, Tensor


def f32(x: np.ndarray) -> np.ndarray:
    """Float operands of any width (bf16, fp8, fp16) are computed in float32, as the engines do."""
    return x.astype(np.float32) if dtypes.is_float(x.dtype) and x.dtype != np.float32 else x


def arith(x: np.ndarray, op: MathOp) -> np.ndarray:
    """Operand values for ``op``: float32 for arithmetic operators, integers for bitvec ones."""
    if op.bitvec:
        if x.dtype.kind not in "iub":
            raise NKIError(f"{op!r} is a bitvec operator: it needs integer operands, got {x.dtype}")
        return x.astype(np.int64)
    return x.astype(np.float32)


def free(t: Tensor) -> int:
    return math.prod(t.shape[1:])


def same_layout(op: str, dst: Tensor, src: Tensor, role: str = "src") -> None:
    if dst.shape[0] != src.shape[0] or free(dst) != free(src):
        raise NKIError(
            f"{op}: dst {list(dst.shape)} and {role} {list(src.shape)} need the same partitions and elements per partition"
        )


def math_op(op, kind: str, what: str) -> MathOp:
    if not isinstance(op, MathOp) or getattr(op, kind) is None:
        raise NKIError(f"{what}: {op!r} is not a {kind} operator")
    return op


def apply_op(op: MathOp, x, v, reverse: bool = False):
    """``x op v`` (``v op x`` when reversed); a unary op ignores ``v`` (NKI: operand None or 0)."""
    if op.binary is None:
        if op.unary is None:
            raise NKIError(f"{op!r} is neither a unary nor a binary operator")
        return op.unary(x)
    with np.errstate(all="ignore"):
        return op.binary(v, x) if reverse else op.binary(x, v)


def scalar_operand(ctx, operand, data: Tensor, op: str, role: str):
    """A compile-time number, or an on-chip [P, 1] tile broadcast along the free axes."""
    if isinstance(operand, Tensor):
        if operand.shape != (data.shape[0], 1):
            raise NKIError(f"{op}: {role} must be a scalar or a [{data.shape[0]}, 1] tile, got {list(operand.shape)}")
        v = f32(ctx.read(operand, op, role))
        return v.reshape((data.shape[0],) + (1,) * (len(data.shape) - 1))
    if isinstance(operand, (bool, np.bool_)) or not isinstance(operand, (int, float, np.integer, np.floating)):
        raise NKIError(f"{op}: {role} must be a number or a tile, got {type(operand).__name__}")
    return np.float32(operand)


def reduce_axes(op: str, t: Tensor, axis) -> tuple:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) % len(t.shape) for a in axes))
    if 0 in axes:
        raise NKIRuleError(6, f"{op} over the partition axis (0) of {t.describe()}; reduce along free axes only")
    if axes != tuple(range(len(t.shape) - len(axes), len(t.shape))):
        raise NKIError(f"{op}: reduction axes {list(axes)} must be the last consecutive free axes")
    return axes


def check_partitions(op: str, *tiles) -> None:
    """Compute instructions address at most 128 partitions (rule 1, also for views)."""
    for t in tiles:
        if isinstance(t, Tensor) and t.alloc.on_chip and t.shape[0] > PMAX:
            raise NKIRuleError(1, f"{op}: {t.describe()} spans {t.shape[0]} partitions > {PMAX}")


def not_both_psum(op: str, a: Tensor, b, roles: str) -> None:
    if isinstance(b, Tensor) and a.buffer == PSUM and b.buffer == PSUM:
        raise NKIError(f"{op}: {roles} cannot both be in PSUM")


def store_where(ctx, t: Tensor, sel: Selector, mask: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` only where ``mask`` holds; the other elements of ``t`` keep their contents."""
    mask = np.broadcast_to(mask, sel.shape)
    flat = sel.flat_indices(t.alloc.data.shape)[mask]
    ctx.store(t, Selector((flat.size,), flat=flat), np.broadcast_to(values, sel.shape)[mask])


# ---- reduce registers -------------------------------------------------------------------------
# One float32 register per partition on each of the Vector and Scalar engines, kept across
# instructions of one kernel call (NKI's reduce_regs / accumulator registers).
_REGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

REDUCE_OPS = ("add", "multiply", "maximum", "minimum", "max", "min", "sum", "prod")


def reduce_into_registers(ctx, engine: str, op: str, reduce_op: MathOp, partials: np.ndarray, cmd, init=None):
    """Fold ``partials`` [P] (this instruction's per-partition reduction) into ``engine``'s
    registers as ``cmd`` says; return the registers' new values [P]."""
    if not isinstance(reduce_op, MathOp) or reduce_op.name not in REDUCE_OPS:
        raise NKIError(f"{op}: reduce_op must be one of nl.add, nl.multiply, nl.maximum, nl.minimum, got {reduce_op!r}")
    regs = _REGS.setdefault(ctx, {}).setdefault(engine, np.zeros(PMAX, np.float32))
    P = partials.shape[0]
    ident = np.float32(reduce_op.identity)
    if cmd in (reduce_cmd.reset, reduce_cmd.reset_reduce):
        regs[:] = ident
    if cmd == reduce_cmd.load_reduce:
        if init is None:
            raise NKIError(f"{op}: reduce_cmd.load_reduce needs reduce_init")
        regs[:P] = init
    elif init is not None:
        raise NKIError(f"{op}: reduce_init is only used with reduce_cmd.load_reduce")
    if cmd in (reduce_cmd.reduce, reduce_cmd.reset_reduce, reduce_cmd.load_reduce):
        with np.errstate(all="ignore"):
            regs[:P] = reduce_op.reduce.reduce(np.stack([regs[:P], partials.astype(np.float32)]), axis=0)
    return regs[:P].copy()


def fold_free(reduce_op: MathOp, y: np.ndarray) -> np.ndarray:
    """``reduce_op`` over all free elements of each partition: [P, ...] -> [P]."""
    with np.errstate(all="ignore"):
        return reduce_op.reduce.reduce(y.reshape(y.shape[0], -1).astype(np.float32), axis=1)
