"""``nki.isa`` (NKI 0.6): ``dma_transpose`` and the virtual-register instructions
(``register_alloc`` / ``register_move`` / ``register_load`` / ``register_store``)."""

from __future__ import annotations

import numpy as np

from .context import current
from .errors import NKIError, NKIRuleError
from .isa_enums import dge_mode, oob_mode
from .tensor import HBM, SBUF, Tensor
from .views import Selector, VirtualRegister

_DGE = dge_mode  # dma_transpose's dge_mode argument shadows the enum's name
_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error,
                  name=None):  # noqa: ARG001 - priority changes speed only
    """dst = src transposed by ``axes`` ((1, 0), (2, 1, 0) or (3, 1, 2, 0), the default for src's
    rank), with the DMA engines; dst in SBUF, src in HBM or SBUF, same dtype, dst.shape exactly
    the permuted src.shape. A src with ``vector_offset`` rows (an indirect gather) uses software
    DGE; its out-of-range rows are an error, or skipped (dst kept) with ``oob_mode.skip``."""
    ctx = current()
    ctx.count("dma", "dma_transpose")
    for role, t in (("dst", dst), ("src", src)):
        if not isinstance(t, Tensor):
            raise NKIError(f"dma_transpose: {role} must be an NKI tensor, got {type(t).__name__}")
    nd = len(src.shape)
    if nd not in _AXES:
        raise NKIError(f"dma_transpose: src must be 2-, 3- or 4-D, got {list(src.shape)}")
    axes = _AXES[nd] if axes is None else tuple(int(a) for a in axes)
    if axes != _AXES[nd]:
        raise NKIError(f"dma_transpose: axes {axes} not supported for a {nd}-D src; use {_AXES[nd]}")
    want = tuple(src.shape[a] for a in axes)
    if tuple(dst.shape) != want:
        raise NKIError(f"dma_transpose: dst must be {list(want)} (src {list(src.shape)} permuted by {axes}), "
                       f"got {list(dst.shape)}")
    if dst.buffer != SBUF:
        raise NKIError(f"dma_transpose: dst must be in SBUF, got {dst.describe()}")
    if dst.dtype != src.dtype:
        raise NKIError(f"dma_transpose: dtypes differ (dst {dst.dtype}, src {src.dtype}); DMA does not convert")
    indirect = src.is_indirect()
    allowed = (_DGE.unknown, _DGE.swdge) if indirect else (_DGE.unknown, _DGE.hwdge)
    if dge_mode not in allowed:
        raise NKIError(f"dma_transpose: dge_mode {dge_mode} not allowed for a {'gather' if indirect else 'direct'} "
                       f"transpose (use {' or '.join(m.name for m in allowed)})")
    if indirect or dge_mode == _DGE.hwdge:
        if src.dtype.itemsize != 2:
            raise NKIError(f"dma_transpose: a {'gather' if indirect else 'hardware-DGE'} transpose moves 2-byte "
                           f"elements, got {src.dtype}")
        if src.shape[-1] > 128:
            raise NKIError(f"dma_transpose: src.shape[-1] must be <= 128, got {src.shape[-1]}")
    if indirect and src.buffer != HBM:
        raise NKIError("dma_transpose: a gather transpose reads HBM")
    if dge_mode == _DGE.hwdge:
        p0 = src.shape[0]
        ok = p0 == 16 if nd == 2 else p0 in (1, 2, 4, 8, 16) and (p0 * src.shape[-2]) % 16 == 0
        if not ok:
            raise NKIError(f"dma_transpose: hardware DGE needs src.shape[0] == 16 (2-D) or in {{1, 2, 4, 8, 16}} with "
                           f"shape[0] * shape[-2] % 16 == 0, got {list(src.shape)}")
    if oob_mode == "skip" and not indirect:
        raise NKIError("dma_transpose: oob_mode.skip is only valid when src uses indirect indexing")
    s = ctx.operand(src, "dma_transpose", "src", on_chip=False, allow_oob=True)
    if not s.all_valid and oob_mode != "skip":
        raise NKIRuleError(12, f"dma_transpose src {src.describe()}: {int((~s.valid).sum())} element(s) out of bounds "
                           "(pass oob_mode=oob_mode.skip to skip them)")
    values = np.transpose(s.get(src.alloc.data), axes)
    ok = np.ones(want, bool) if s.valid is None else np.transpose(s.valid, axes)
    d = ctx.operand(dst, "dma_transpose", "dst", mode="w")
    flat = d.flat_indices(dst.alloc.data.shape)[ok]
    ctx.store(dst, Selector((flat.size,), flat=flat), values[ok])
    nbytes = int(ok.sum()) * src.dtype.itemsize
    ctx.stats.dma_bytes += nbytes
    if src.buffer == HBM:
        ctx.stats.hbm_read_bytes += nbytes


# ---- virtual registers ----------------------------------------------------------------------
# A register holds a 32-bit integer at run time (loop bounds, runtime offsets: ``.ap(scalar_offset=reg)``
# and ``.select(dim, reg)`` accept one). Register instructions run on the engines' sequencers and
# are counted under the "sync" engine.


def register_alloc(x=None) -> VirtualRegister:
    if x is not None and (isinstance(x, bool) or not isinstance(x, (int, np.integer))):
        raise NKIError(f"register_alloc: the initial value must be an integer or None, got {x!r}")
    ctx = current()
    ctx.count("sync", "register_alloc")
    return VirtualRegister(None if x is None else _int32(x), f"reg{ctx.stats.ops['register_alloc']}")


def register_move(dst, src) -> None:
    _reg(dst, "register_move dst")
    current().count("sync", "register_move")
    dst.value = src.read() if isinstance(src, VirtualRegister) else _int32(_plain_int(src, "register_move src"))


def register_load(dst, src) -> None:
    """dst = the one (up to 32-bit integer) value of src, an HBM or SBUF tensor of shape [1] or [1, 1]."""
    _reg(dst, "register_load dst")
    ctx = current()
    ctx.count("sync", "register_load")
    if not isinstance(src, Tensor) or src.size != 1 or len(src.shape) > 2:
        raise NKIError(f"register_load: src must be a one-element tensor ([1] or [1, 1]), got {src!r}")
    if src.dtype.kind not in "iub" or src.dtype.itemsize > 4:
        raise NKIError(f"register_load: src must hold a 32-bit (or narrower) integer, got {src.dtype}")
    dst.value = _int32(int(ctx.operand(src, "register_load", "src", on_chip=False).get(src.alloc.data).reshape(-1)[0]))


def register_store(dst, src) -> None:
    """Write a register's value into dst, a one-element integer tensor in HBM or SBUF."""
    _reg(src, "register_store src")
    ctx = current()
    ctx.count("sync", "register_store")
    if not isinstance(dst, Tensor) or dst.size != 1 or len(dst.shape) > 2:
        raise NKIError(f"register_store: dst must be a one-element tensor ([1] or [1, 1]), got {dst!r}")
    sel = ctx.operand(dst, "register_store", "dst", mode="w", on_chip=False)
    ctx.store(dst, sel, np.full(sel.shape, src.read(), dtype=np.int64))


def _reg(r, what: str) -> None:
    if not isinstance(r, VirtualRegister):
        raise NKIError(f"{what} must be a register from nisa.register_alloc(), got {type(r).__name__}")


def _plain_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise NKIError(f"{what} must be a compile-time integer or a register, got {v!r}")
    return int(v)


def _int32(v: int) -> int:
    return int(np.array(v, dtype=np.int64).astype(np.uint32).astype(np.int32))
