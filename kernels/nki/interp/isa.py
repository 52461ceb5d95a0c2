"""``nki.isa`` (NKI 0.6): DMA, tensor-engine, and the element-wise / activation instructions
(``dst`` first, nothing returned). More instructions live in isa_vector.py (selects, scans,
shuffles, top-8) and isa_dma.py (``dma_transpose``, registers); all are exported here.

Every instruction counts itself on its engine; compute instructions read and write only SBUF
and PSUM (rule 5) and compute in float32, their results rounded to the destination dtype.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .context import current
from .errors import NKIError, NKIRuleError
from .isa_common import (
    apply_op,
    arith,
    check_partitions,
    fold_free,
    math_op,
    reduce_into_registers,
    same_layout,
    scalar_operand,
)
from .isa_common import f32 as _f32
from .isa_common import free as _free
from .isa_common import reduce_axes as _reduce_axes  # noqa: F401 - used by nki.language
from .isa_enums import (  # noqa: F401 - part of nki.isa
    dge_mode,
    dma_engine,
    engine,
    engine_of,
    get_nc_sub_version,
    get_nc_version,
    gpsimd_engine,
    matmul_perf_mode,
    nc_version,
    oob_mode,
    reduce_cmd,
    scalar_engine,
    target_name,
    tensor_engine,
    unknown_engine,
    vector_engine,
)
from . import ops as _ops
from .ops import MathOp
from .tensor import HBM, PSUM, SBUF, Tensor
from .views import VirtualRegister  # noqa: F401 - nki.isa.VirtualRegister

_same_layout, _math, _scalar_operand = same_layout, math_op, scalar_operand
_CMD = reduce_cmd  # instructions' reduce_cmd arguments shadow the enum's name


# ---- data movement --------------------------------------------------------------------------


def dma_copy(dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
             name=None):  # noqa: ARG001 - priority, dge_mode, engine change speed only
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
        ctx.copy_elements(src, src_flat, dst, dst_flat)  # carries which values are undefined (rule 9)
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
    ctx.count(engine_of(engine, "vector", ("vector", "scalar", "gpsimd")), "tensor_copy")
    check_partitions("tensor_copy", dst, src)
    _same_layout("tensor_copy", dst, src)
    ctx.write(dst, ctx.read(src, "tensor_copy", "src"), "tensor_copy")


def memset(dst, value, engine=None, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count(engine_of(engine, "vector", ("vector", "gpsimd")), "memset")
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
              accumulate=None, tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None):  # noqa: ARG001
    """dst[M, N] (+)= stationary[K, M].T @ moving[K, N] on the tensor engine (rule 4).

    Operands: float8_e4m3 / float8_e5m2 / bfloat16 / float16 / float32, plus float8_e4m3fn on trn3
    (never mixed with the legacy float8_e4m3); dst float32 (or bfloat16 on trn3)."""
    ctx = current()
    ctx.count("tensor", "nc_matmul")
    if perf_mode not in (None, matmul_perf_mode.none, "none"):
        raise NKIError(f"nc_matmul: perf_mode {perf_mode!r} (fp8 double-row packing) is not supported by the interpreter")
    trn3 = target_name() == "trn3"
    for role, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MATMUL_IN or (t.dtype == dtypes.float8_e4m3fn and not trn3):
            raise NKIRuleError(4, f"{role} dtype {t.dtype} is not a tensor-engine input on {target_name()} "
                               "(float8_e4m3, float8_e5m2, bfloat16, float16, float32; float8_e4m3fn on trn3)")
    if {stationary.dtype, moving.dtype} == {dtypes.float8_e4m3, dtypes.float8_e4m3fn}:
        raise NKIRuleError(4, "legacy float8_e4m3 and OCP float8_e4m3fn operands cannot be mixed in one matmul")
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
    dst_ok = dst.dtype == dtypes.float32 or (trn3 and dst.dtype == dtypes.bfloat16)
    if dst.buffer != PSUM or not dst_ok or dst.shape[0] != M or _free(dst) != N:
        raise NKIRuleError(4, f"dst must be a float32 PSUM tile [{M}, {N}] (bfloat16 also on trn3), got "
                           f"{dst.describe()} {dst.dtype}")
    result = _f32(st).reshape(K, M).T @ _f32(mv).reshape(K, N)  # [M, N], float32 accumulation
    if accumulate is False:
        ctx.write(dst, result, "nc_matmul")
        return
    # accumulate=True adds to what is there (NaN where nothing was written, rule 9); None adds only where written
    sel = ctx.operand(dst, "nc_matmul", "dst", mode="a", must_be_written=bool(accumulate))
    old = sel.get(dst.alloc.data).reshape(M, N)
    seen = sel.get(dst.alloc.written).reshape(M, N) if dst.alloc.written is not None else np.ones((M, N), bool)
    ctx.store(dst, sel, np.where(seen | bool(accumulate), old + result, result))


_MATMUL_IN = frozenset({dtypes.float8_e4m3, dtypes.float8_e4m3fn, dtypes.float8_e5m2, dtypes.bfloat16, dtypes.float16,
                        dtypes.float32})


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
    ctx.count(engine_of(engine, "vector", ("vector", "gpsimd")), "tensor_tensor")
    op = _math(op, "binary", "tensor_tensor")
    check_partitions("tensor_tensor", dst, data1, data2)
    _same_layout("tensor_tensor", dst, data1, "data1")
    _same_layout("tensor_tensor", dst, data2, "data2")
    a = arith(ctx.read(data1, "tensor_tensor", "data1"), op).reshape(dst.shape)
    b = arith(ctx.read(data2, "tensor_tensor", "data2"), op).reshape(dst.shape)
    ctx.write(dst, apply_op(op, a, b), "tensor_tensor")


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=None,
                  name=None):  # noqa: ARG001
    """dst = (data op0 operand0) op1 operand1; each operand a number or a [P, 1] tile. A unary
    operator (e.g. nl.abs, nl.rsqrt) as op0/op1 ignores its operand."""
    ctx = current()
    ctx.count(engine_of(engine, "vector", ("vector", "scalar", "gpsimd")), "tensor_scalar")
    check_partitions("tensor_scalar", dst, data)
    _same_layout("tensor_scalar", dst, data, "data")
    x = ctx.read(data, "tensor_scalar", "data")
    stages = [(op0, operand0, reverse0, "operand0")]
    if op1 is not None:
        stages.append((op1, operand1, reverse1, "operand1"))
    elif operand1 is not None:
        raise NKIError("tensor_scalar: operand1 given without op1")
    for op, operand, reverse, role in stages:
        if not isinstance(op, MathOp):
            raise NKIError(f"tensor_scalar: {op!r} is not an operator")
        x = arith(np.asarray(x), op)
        v = None if op.binary is None and operand in (None, 0) else _scalar_operand(ctx, operand, data, "tensor_scalar", role)
        x = apply_op(op, x, arith(np.asarray(v), op) if v is not None else None, reverse)
    ctx.write(dst, x, "tensor_scalar")


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


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle,
               name=None):  # noqa: ARG001
    """dst = op(data * scale + bias) on the scalar engine; bias/scale are numbers or [P, 1] tiles (rule 8).

    Reduction along the free axes (``reduce_op``, folded into the engine's per-partition reduce
    registers as ``reduce_cmd`` says; ``reduce_res`` [P, 1] receives the registers). With
    ``reduce_res`` and the default ``reduce_cmd.idle``, the registers are reset first (what
    ``activation_reduce`` does), so ``reduce_res`` holds this instruction's reduction."""
    ctx = current()
    ctx.count("scalar", "activation")
    y = _activate("activation", ctx, dst, op, data, bias, scale)
    _activation_reduce_regs("activation", ctx, y, reduce_op, reduce_res, reduce_cmd)


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):  # noqa: ARG001
    """``activation`` with ``reduce_cmd.reset_reduce``: reduce_res[P, 1] = reduce_op over the free axes of dst."""
    ctx = current()
    ctx.count("scalar", "activation_reduce")
    y = _activate("activation_reduce", ctx, dst, op, data, bias, scale)
    _activation_reduce_regs("activation_reduce", ctx, y, reduce_op, reduce_res, _CMD.reset_reduce)


def _activate(name, ctx, dst, op, data, bias, scale) -> np.ndarray:
    fn = _math(op, "unary", name).unary
    check_partitions(name, dst, data)
    _same_layout(name, dst, data, "data")
    P = data.shape[0]
    for role, v in (("bias", bias), ("scale", scale)):
        if isinstance(v, Tensor) and v.shape != (P, 1):
            raise NKIRuleError(8, f"{role} must be one value per partition [{P}, 1], got {list(v.shape)}")
    x = _f32(ctx.read(data, name, "data")).astype(np.float32)
    s = _scalar_operand(ctx, scale, data, name, "scale")
    b = np.float32(0.0) if bias is None else _scalar_operand(ctx, bias, data, name, "bias")
    with np.errstate(all="ignore"):
        y = np.asarray(fn(x * s + b), dtype=np.float32)
    ctx.write(dst, y, name)
    return y


def _activation_reduce_regs(name, ctx, y, reduce_op, reduce_res, cmd) -> None:
    P = y.shape[0]
    if cmd in (None, _CMD.idle):
        cmd = _CMD.reset_reduce if reduce_res is not None else _CMD.idle
    if cmd not in (_CMD.idle, _CMD.reset):
        if reduce_op is None:
            raise NKIError(f"{name}: reduce_cmd {cmd.name} needs a reduce_op")
        partial = fold_free(reduce_op, y)
    else:
        partial = np.zeros(P, np.float32)
    regs = reduce_into_registers(ctx, "scalar", name, reduce_op or _ops.add, partial, cmd)
    if reduce_res is not None:
        if reduce_res.shape != (P, 1):
            raise NKIError(f"{name}: reduce_res must be [{P}, 1], got {list(reduce_res.shape)}")
        ctx.write(reduce_res, regs.reshape(P, 1), name, "reduce_res")


def reciprocal(dst, data, name=None):  # noqa: ARG001
    ctx = current()
    ctx.count("vector", "reciprocal")
    _same_layout("reciprocal", dst, data, "data")
    with np.errstate(all="ignore"):
        ctx.write(dst, 1.0 / _f32(ctx.read(data, "reciprocal", "data")), "reciprocal")


# ---- the rest of nki.isa ----------------------------------------------------------------------
from .isa_dma import dma_transpose, register_alloc, register_load, register_move, register_store  # noqa: E402, F401
from .isa_vector import (  # noqa: E402, F401
    affine_select,
    max8,
    nc_find_index8,
    nc_stream_shuffle,
    range_select,
    scalar_tensor_tensor,
    tensor_copy_predicated,
    tensor_scalar_reduce,
    tensor_tensor_scan,
)
