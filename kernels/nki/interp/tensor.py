"""Tensors of the NKI interpreter: allocations in HBM/SBUF/PSUM and the views kernels take of
them (slices and access patterns).

A view never copies. Each instruction resolves its operands into a :class:`Selector` (which
elements of the allocation, and whether each is in bounds) at the moment it runs, so an
access pattern with a runtime offset reads that offset's current value.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .errors import NKIError

SBUF, PSUM, HBM = "sbuf", "psum", "hbm"
PMAX = 128  # partitions of SBUF and PSUM


class Allocation:
    """One buffer: its data (C-contiguous), which elements were written, and its lifetime."""

    __slots__ = ("id", "data", "written", "buffer", "name", "depth", "live", "partition_bytes", "psum_banks")

    def __init__(self, data: np.ndarray, buffer: str, name: str, depth: int, written: np.ndarray | None, aid: int):
        self.id = aid
        self.data = data
        self.written = written  # None: every element counts as written (kernel inputs)
        self.buffer = buffer
        self.name = name
        self.depth = depth  # scope depth at allocation; the scope's end frees it
        self.live = True
        self.partition_bytes = 0
        self.psum_banks = 0

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def on_chip(self) -> bool:
        return self.buffer != HBM


class Selector:
    """The elements of an allocation that one operand touches, in the operand's shape."""

    __slots__ = ("key", "flat", "valid", "shape")

    def __init__(self, shape, key=None, flat=None, valid=None):
        self.shape = tuple(shape)
        self.key = key  # NumPy basic index into the allocation, or None
        self.flat = flat  # int64 flat indices [shape] (clipped into range where invalid)
        self.valid = valid  # bool [shape] or None when all are in bounds

    @property
    def all_valid(self) -> bool:
        return self.valid is None

    def get(self, arr: np.ndarray) -> np.ndarray:
        if self.key is not None:
            return arr[self.key].reshape(self.shape)
        return arr.reshape(-1)[self.flat]

    def set(self, arr: np.ndarray, values) -> None:
        if self.key is not None:
            arr[self.key] = np.reshape(values, arr[self.key].shape) if np.ndim(values) else values
        else:
            arr.reshape(-1)[self.flat] = values

    def in_bounds(self) -> "Selector":
        """The same selector restricted to its in-bounds elements (flattened)."""
        if self.valid is None:
            return self
        return Selector((int(self.valid.sum()),), flat=self.flat[self.valid])


def _int(v, what: str) -> int:
    if isinstance(v, Tensor):
        raise NKIError(f"{what} must be a compile-time integer; use .ap(scalar_offset=...) for a runtime offset")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise NKIError(f"{what} must be an integer, got {v!r}")
    return int(v)


class Tensor:
    """A view of an :class:`Allocation`: the whole of it, a slice, or an access pattern."""

    __slots__ = ("alloc", "shape", "_kind", "_spec")

    def __init__(self, alloc: Allocation, shape, kind: str = "full", spec=None):
        self.alloc = alloc
        self.shape = tuple(int(s) for s in shape)
        self._kind = kind  # "full" | "slice" | "ap"
        self._spec = spec

    # ---- what a kernel may look at ----------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self.alloc.dtype

    @property
    def buffer(self) -> str:
        return self.alloc.buffer

    @property
    def name(self) -> str:
        return self.alloc.name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        view = "" if self._kind == "full" else f" ({self._kind} {list(self.shape)})"
        return f"{self.alloc.name}{list(self.alloc.data.shape)}@{self.alloc.buffer}{view}"

    def __repr__(self) -> str:
        return f"<nki tensor {self.describe()} {self.dtype}>"

    def _no_value(self, *_):
        raise NKIError(
            f"{self.describe()} holds runtime values: they cannot drive Python control flow or be "
            "converted to Python numbers inside a kernel"
        )

    __bool__ = __index__ = __int__ = __float__ = __iter__ = _no_value

    def __len__(self) -> int:
        return self.shape[0]

    # ---- views ------------------------------------------------------------------------------
    def __getitem__(self, idx) -> "Tensor":
        if self._kind != "full":
            raise NKIError(f"nested indexing of {self.describe()} is not supported (NKI 0.3): index the base tensor")
        shape = self.alloc.data.shape
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[at + 1 :]
        if len(idx) > len(shape):
            raise NKIError(f"too many indices ({len(idx)}) for {self.describe()}")
        idx = idx + (slice(None),) * (len(shape) - len(idx))
        starts, sizes, keep = [], [], []
        for d, (ix, n) in enumerate(zip(idx, shape)):
            if isinstance(ix, slice):
                if ix.step not in (None, 1):
                    raise NKIError(f"axis {d}: strided slices are not supported; use .ap(pattern=...)")
                start = 0 if ix.start is None else _int(ix.start, f"axis {d} slice start")
                stop = n if ix.stop is None else _int(ix.stop, f"axis {d} slice stop")
                if start < 0 or stop < 0:
                    raise NKIError(f"axis {d}: negative slice bounds {start}:{stop} are not supported")
                if stop <= start:
                    raise NKIError(f"axis {d}: empty slice {start}:{stop} of {self.describe()}")
                starts.append(start), sizes.append(stop - start), keep.append(True)
            else:
                starts.append(_int(ix, f"axis {d} index")), sizes.append(1), keep.append(False)
        oob = any(s < 0 or s + z > n for s, z, n in zip(starts, sizes, shape))
        if self.alloc.on_chip:
            if oob:
                raise NKIError(
                    f"index {_fmt(starts, sizes, keep)} out of bounds of {self.describe()} (on-chip tensors are not bounds-"
                    "checked by DMA; this is a kernel bug)"
                )
            if not keep[0]:
                raise NKIError(f"{self.describe()}: the partition axis (0) of an on-chip tensor cannot be indexed away")
        new_shape = tuple(z for z, k in zip(sizes, keep) if k)
        return Tensor(self.alloc, new_shape, "slice", (tuple(starts), tuple(sizes), tuple(keep), oob))

    def ap(self, pattern, offset=0, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None) -> "Tensor":
        """Access pattern: ``pattern=[[step, count], ...]`` over the flattened tensor from ``offset``.

        ``scalar_offset`` (a [1, 1] SBUF int) or ``vector_offset`` (an [n, 1] SBUF int, one per
        element of the first pattern entry, replacing its step) adds a runtime index along
        ``indirect_dim`` of this tensor, whose stride comes from the tensor's shape.
        """
        if self._kind != "full":
            raise NKIError("an access pattern cannot be specified on an already indexed tensor")
        if dtype is not None and dtypes.as_dtype(dtype) != self.dtype:
            raise NKIError("reinterpreting a tensor through .ap(dtype=...) is not supported by the interpreter")
        try:
            pat = [(int(step), int(count)) for step, count in pattern]
        except (TypeError, ValueError):
            raise NKIError(f"pattern must be a list of [step, count] pairs, got {pattern!r}") from None
        if not pat or any(c < 1 for _, c in pat):
            raise NKIError(f"pattern {pattern!r}: every count must be >= 1")
        offset = _int(offset, "ap offset")
        if scalar_offset is not None and vector_offset is not None:
            raise NKIError("at most one of scalar_offset and vector_offset may be given")
        shape = self.alloc.data.shape
        if not 0 <= indirect_dim < len(shape):
            raise NKIError(f"indirect_dim {indirect_dim} out of range for {self.describe()}")
        if self.alloc.on_chip:
            free = math.prod(shape[1:])
            if pat[0][0] != free:
                raise NKIError(
                    f"{self.describe()}: the first pattern entry walks partitions and must step by the free size "
                    f"{free}, got {pat[0][0]} (partition access is contiguous)"
                )
        for name, t in (("scalar_offset", scalar_offset), ("vector_offset", vector_offset)):
            if t is not None and not isinstance(t, Tensor):
                raise NKIError(f"{name} must be an SBUF integer tensor, got {type(t).__name__}")
        if vector_offset is not None and vector_offset.shape != (pat[0][1], 1):
            raise NKIError(f"vector_offset must be [{pat[0][1]}, 1] (one offset per row), got {list(vector_offset.shape)}")
        return Tensor(self.alloc, [c for _, c in pat], "ap", (pat, offset, scalar_offset, vector_offset, indirect_dim))

    # ---- resolution (called by instructions) -------------------------------------------------
    def resolve(self, read_offset) -> Selector:
        """The elements this view touches now. ``read_offset(tensor, role)`` reads a runtime offset."""
        if self._kind == "full":
            return Selector(self.shape, key=())
        if self._kind == "slice":
            starts, sizes, keep, oob = self._spec
            if not oob:
                key = tuple(slice(s, s + z) if k else s for s, z, k in zip(starts, sizes, keep))
                return Selector(self.shape, key=key)
            coords = np.meshgrid(*[np.arange(s, s + z) for s, z in zip(starts, sizes)], indexing="ij")
            return _from_coords(coords, self.alloc.data.shape, self.shape, None)
        pat, offset, scalar_offset, vector_offset, indirect_dim = self._spec
        steps = [s for s, _ in pat]
        if vector_offset is not None:
            steps[0] = 0  # each row starts at its own runtime offset instead
        flat = np.full(self.shape, offset, dtype=np.int64)
        for d, (step, count) in enumerate(zip(steps, self.shape)):
            if step:
                flat += (np.arange(count, dtype=np.int64) * step).reshape((count,) + (1,) * (len(self.shape) - d - 1))
        size = self.alloc.data.size
        if scalar_offset is None and vector_offset is None:
            valid = (flat >= 0) & (flat < size)
            if valid.all():
                return Selector(self.shape, flat=flat)
            return Selector(self.shape, flat=np.clip(flat, 0, size - 1), valid=valid)
        if scalar_offset is not None:
            dyn = np.int64(read_offset(scalar_offset, "scalar_offset").reshape(-1)[0])
        else:
            dyn = read_offset(vector_offset, "vector_offset").astype(np.int64).reshape((-1,) + (1,) * (len(self.shape) - 1))
        static_ok = (flat >= 0) & (flat < size)
        coords = list(np.unravel_index(np.clip(flat, 0, size - 1), self.alloc.data.shape))
        coords[indirect_dim] = coords[indirect_dim] + dyn
        return _from_coords(coords, self.alloc.data.shape, self.shape, static_ok)


def _from_coords(coords, base_shape, view_shape, extra_valid) -> Selector:
    coords = [np.broadcast_to(c, view_shape) for c in coords]
    valid = np.ones(view_shape, dtype=bool) if extra_valid is None else extra_valid.copy()
    for c, n in zip(coords, base_shape):
        valid &= (c >= 0) & (c < n)
    clipped = [np.clip(c, 0, n - 1) for c, n in zip(coords, base_shape)]
    flat = np.ravel_multi_index(clipped, base_shape).astype(np.int64)
    return Selector(view_shape, flat=flat, valid=None if valid.all() else valid)


def _fmt(starts, sizes, keep) -> str:
    return "[" + ", ".join(f"{s}:{s + z}" if k else str(s) for s, z, k in zip(starts, sizes, keep)) + "]"
