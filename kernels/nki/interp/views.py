"""Views of NKI tensors: indexing, the NkiTensor view methods of NKI 0.6 (``slice``, ``select``,
``permute``, ``broadcast``, ``expand_dim``, ``squeeze_dim``, ``reshape``, ``reshape_dim``,
``flatten_dims``, ``rearrange``, ``vector_select``) and access patterns (``ap``).

Every view is a strided walk over its allocation's row-major elements: a start offset and one
``[stride, count]`` pair per dimension (what ``get_pattern()`` returns), as on hardware. A view
never copies; an instruction resolves each operand into a :class:`Selector` (which elements, and
whether each is in bounds) when it runs, so a runtime offset reads its current value then.

On-chip tensors keep their partition axis as dimension 0 of every view (NKI's rule): view
methods that would move, merge, broadcast or drop it raise :class:`NKIError`.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .errors import NKIError


from .selector import Selector, VirtualRegister, _walk_offsets, c_strides  # noqa: F401 - re-exported


def _int(v, what: str) -> int:
    if hasattr(v, "alloc") or isinstance(v, VirtualRegister):
        raise NKIError(f"{what} must be a compile-time integer; use .select(dim, index_tile) or "
                       ".ap(scalar_offset=...) for a runtime index")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise NKIError(f"{what} must be an integer, got {v!r}")
    return int(v)


class Layout:
    """A view's walk over its allocation: ``offset + sum(i_d * strides[d])``.

    ``valid``: per dimension, the index range ``[lo, hi)`` inside the tensor (only HBM views may
    reach outside it; DMA then raises rule 12 or skips them); None when all are inside.
    ``flat_check``: an access pattern, whose flat indices are checked against the allocation.
    ``dyn``: a runtime index (:class:`Dynamic`), or None.
    """

    __slots__ = ("offset", "strides", "valid", "flat_check", "dyn")

    def __init__(self, offset, strides, valid=None, flat_check=False, dyn=None):
        self.offset = int(offset)
        self.strides = tuple(int(s) for s in strides)
        self.valid = valid
        self.flat_check = flat_check
        self.dyn = dyn


class Dynamic:
    """A runtime index added to a view: one value (``vector=False``) or one per element of view
    dimension 0, times ``stride`` elements. The index must keep base coordinate ``coord_dim``
    inside the tensor (access patterns), or lie in ``[0, bound)`` (``select``/``vector_select``)."""

    __slots__ = ("index", "vector", "stride", "coord_dim", "bound", "what")

    def __init__(self, index, vector, stride, coord_dim=None, bound=None, what="scalar_offset"):
        self.index, self.vector, self.stride = index, vector, int(stride)
        self.coord_dim, self.bound, self.what = coord_dim, bound, what


class ViewMethods:
    """The view methods of ``Tensor`` (mixed in; a Tensor has ``alloc``, ``shape``, ``_kind``, ``_spec``)."""

    __slots__ = ()

    # ---- layout -----------------------------------------------------------------------------
    def _layout(self) -> Layout:
        if self._kind == "full":
            return Layout(0, c_strides(self.alloc.data.shape))
        return self._spec

    def _view(self, shape, offset, strides, valid=None, flat_check=False, dyn=None):
        if valid is not None and all(lo == 0 and hi == n for (lo, hi), n in zip(valid, shape)):
            valid = None
        return type(self)(self.alloc, shape, "view", Layout(offset, strides, valid and tuple(valid), flat_check, dyn))

    def _ranges(self, lay: Layout) -> list:
        return list(lay.valid) if lay.valid is not None else [(0, n) for n in self.shape]

    def _whole(self, op: str, lay: Layout, dims) -> None:
        """Refuse to restructure dimensions of a view that reach outside the tensor."""
        if lay.valid is not None and any(lay.valid[d] != (0, self.shape[d]) for d in dims):
            raise NKIError(f"{op}: {self.describe()} reaches outside its tensor along a dimension it restructures")

    def _partition_kept(self, op: str, ok: bool, lay: Layout | None = None) -> None:
        lay = lay or self._layout()
        if not ok and (self.alloc.on_chip or (lay.dyn is not None and lay.dyn.vector)):
            what = "partition axis (0) of an on-chip tensor" if self.alloc.on_chip else "per-row indirect axis (0)"
            raise NKIError(f"{op}: the {what} must stay dimension 0 of the view ({self.describe()})")

    def _dim(self, dim, op: str, extra: int = 0) -> int:
        d = _int(dim, f"{op} dim")
        n = self.ndim + extra
        if d < 0:
            d += n
        if not 0 <= d < n:
            raise NKIError(f"{op}: dim {dim} out of range for {self.ndim}-D {self.describe()}")
        return d

    # ---- queries ----------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def strides(self) -> tuple:
        return self._layout().strides

    @property
    def offset(self) -> int:
        return self._layout().offset

    def get_pattern(self) -> list:
        """``[[stride, count], ...]``, one pair per dimension (elements of the allocation)."""
        lay = self._layout()
        return [[s, n] for s, n in zip(lay.strides, self.shape)]

    def is_indirect(self) -> bool:
        return self._layout().dyn is not None

    def is_contiguous(self) -> bool:
        """Row-major over its elements (the partition axis of on-chip tensors not counted)."""
        lay = self._layout()
        first = 1 if self.alloc.on_chip else 0
        inner = 1
        for d in range(self.ndim - 1, first - 1, -1):
            if self.shape[d] != 1 and lay.strides[d] != inner:
                return False
            inner *= self.shape[d]
        return True

    # ---- indexing ---------------------------------------------------------------------------
    def __getitem__(self, idx):
        lay = self._layout()
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[at + 1 :]
        if len(idx) > self.ndim:
            raise NKIError(f"too many indices ({len(idx)}) for {self.describe()}")
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        ranges = self._ranges(lay)
        shape, strides, valid, offset = [], [], [], lay.offset
        for d, (ix, n) in enumerate(zip(idx, self.shape)):
            st, (lo, hi) = lay.strides[d], ranges[d]
            if d == 0 and lay.dyn is not None and lay.dyn.vector and ix != slice(None):
                raise NKIError(f"{self.describe()}: the per-row indirect axis (0) cannot be sliced or indexed")
            if isinstance(ix, slice):
                step = 1 if ix.step is None else _int(ix.step, f"axis {d} slice step")
                start = 0 if ix.start is None else _int(ix.start, f"axis {d} slice start")
                stop = n if ix.stop is None else _int(ix.stop, f"axis {d} slice stop")
                start, stop = start + n if start < 0 else start, stop + n if stop < 0 else stop
                if step < 1:
                    raise NKIError(f"axis {d}: slice step must be >= 1, got {step}")
                if start < 0 or stop <= start:
                    raise NKIError(f"axis {d}: empty or negative slice {ix.start}:{ix.stop} of {self.describe()}")
                count = -(-(stop - start) // step)
                k_lo = max(0, -(-(lo - start) // step))
                k_hi = min(count, max(0, -(-(hi - start) // step)))
                if (k_lo, k_hi) != (0, count) and self.alloc.on_chip:
                    raise NKIError(f"axis {d}: slice {start}:{stop} out of bounds of {self.describe()} (on-chip "
                                   "tensors are not bounds-checked by DMA; this is a kernel bug)")
                offset += start * st
                shape.append(count), strides.append(st * step), valid.append((k_lo, min(max(k_hi, k_lo), count)))
            else:
                i = _int(ix, f"axis {d} index")
                i = i + n if i < 0 else i
                if not lo <= i < hi:
                    raise NKIError(f"index {ix} out of bounds of axis {d} of {self.describe()}")
                offset += i * st
                if d == 0 and self.alloc.on_chip:  # the partition axis stays, as a size-1 slice
                    shape.append(1), strides.append(st), valid.append((0, 1))
        return self._view(shape, offset, strides, valid, lay.flat_check, lay.dyn)

    def slice(self, dim, start, end, step=1):
        """``t[..., start:end:step, ...]`` along ``dim``: 0 <= start < end <= shape[dim], step >= 1."""
        d = self._dim(dim, "slice")
        start, end, step = _int(start, "slice start"), _int(end, "slice end"), _int(step, "slice step")
        if not (0 <= start < end <= self.shape[d]) or step < 1:
            raise NKIError(f"slice(dim={d}, {start}, {end}, step={step}) of {self.describe()}: need "
                           f"0 <= start < end <= {self.shape[d]} and step >= 1")
        return self[(slice(None),) * d + (slice(start, end, step),)]

    def select(self, dim, index):
        """Remove ``dim`` by picking one index: a compile-time int, or a runtime ``[1, 1]`` int tile
        or register (indirect: read when an instruction runs)."""
        d = self._dim(dim, "select")
        lay = self._layout()
        if d == 0:
            self._partition_kept("select", False, lay)
        if not (hasattr(index, "alloc") or isinstance(index, VirtualRegister)):
            i = _int(index, "select index")
            if not 0 <= i < self.shape[d]:
                raise NKIError(f"select(dim={d}, {i}) out of range [0, {self.shape[d]}) of {self.describe()}")
            return self[(slice(None),) * d + (i,)]
        if lay.dyn is not None:
            raise NKIError(f"select: {self.describe()} already has a runtime index (one per view)")
        self._whole("select", lay, [d])
        _check_index_tile(index, (1, 1), "select index")
        keep = [k for k in range(self.ndim) if k != d]
        dyn = Dynamic(index, False, lay.strides[d], bound=self.shape[d], what="select index")
        valid = [self._ranges(lay)[k] for k in keep]
        return self._view([self.shape[k] for k in keep], lay.offset, [lay.strides[k] for k in keep], valid,
                          lay.flat_check, dyn)

    def vector_select(self, dim, vector_offset):
        """HBM only: row p of the view is row ``vector_offset[p]`` of dimension 0."""
        if _int(dim, "vector_select dim") != 0:
            raise NKIError("vector_select: dim must be 0")
        if self.alloc.on_chip:
            raise NKIError(f"vector_select is for HBM tensors, got {self.describe()}")
        lay = self._layout()
        if lay.dyn is not None:
            raise NKIError(f"vector_select: {self.describe()} already has a runtime index (one per view)")
        self._whole("vector_select", lay, [0])
        _check_index_tile(vector_offset, None, "vector_offset")
        rows = vector_offset.shape[0]
        dyn = Dynamic(vector_offset, True, lay.strides[0], bound=self.shape[0], what="vector_offset")
        valid = [(0, rows)] + self._ranges(lay)[1:]
        return self._view((rows,) + self.shape[1:], lay.offset, (0,) + lay.strides[1:], valid, lay.flat_check, dyn)

    # ---- reordering and reshaping -------------------------------------------------------------
    def permute(self, dims):
        dims = tuple(_int(d, "permute dim") for d in dims)
        if sorted(dims) != list(range(self.ndim)):
            raise NKIError(f"permute: {list(dims)} is not a permutation of range({self.ndim})")
        self._partition_kept("permute", dims[0] == 0)
        lay = self._layout()
        ranges = self._ranges(lay)
        return self._view([self.shape[d] for d in dims], lay.offset, [lay.strides[d] for d in dims],
                          [ranges[d] for d in dims], lay.flat_check, lay.dyn)

    def broadcast(self, dim, size):
        """Repeat a size-1 dimension ``size`` times (stride 0)."""
        d, size = self._dim(dim, "broadcast"), _int(size, "broadcast size")
        if self.shape[d] != 1 or size < 1:
            raise NKIError(f"broadcast: dimension {d} of {self.describe()} has size {self.shape[d]}, not 1")
        self._partition_kept("broadcast", d != 0)
        lay = self._layout()
        ranges = self._ranges(lay)
        ranges[d] = (0, size) if ranges[d] == (0, 1) else (0, 0)
        shape, strides = list(self.shape), list(lay.strides)
        shape[d], strides[d] = size, 0
        return self._view(shape, lay.offset, strides, ranges, lay.flat_check, lay.dyn)

    def expand_dim(self, dim):
        d = self._dim(dim, "expand_dim", extra=1)
        self._partition_kept("expand_dim", d != 0)
        lay = self._layout()
        ranges = self._ranges(lay)
        return self._view(self.shape[:d] + (1,) + self.shape[d:], lay.offset, lay.strides[:d] + (0,) + lay.strides[d:],
                          ranges[:d] + [(0, 1)] + ranges[d:], lay.flat_check, lay.dyn)

    def squeeze_dim(self, dim):
        d = self._dim(dim, "squeeze_dim")
        if self.shape[d] != 1:
            raise NKIError(f"squeeze_dim: dimension {d} of {self.describe()} has size {self.shape[d]}, not 1")
        self._partition_kept("squeeze_dim", d != 0)
        lay = self._layout()
        self._whole("squeeze_dim", lay, [d])
        ranges = self._ranges(lay)
        return self._view(self.shape[:d] + self.shape[d + 1 :], lay.offset, lay.strides[:d] + lay.strides[d + 1 :],
                          ranges[:d] + ranges[d + 1 :], lay.flat_check, lay.dyn)

    def reshape_dim(self, dim, shape):
        """Split dimension ``dim`` into ``shape`` (one entry may be -1)."""
        d = self._dim(dim, "reshape_dim")
        parts = _infer(tuple(_int(s, "reshape_dim size") for s in shape), self.shape[d], "reshape_dim")
        self._partition_kept("reshape_dim", d != 0 or len(parts) == 1)
        lay = self._layout()
        self._whole("reshape_dim", lay, [d])
        split = [c * lay.strides[d] for c in c_strides(parts)]
        ranges = self._ranges(lay)
        return self._view(self.shape[:d] + parts + self.shape[d + 1 :], lay.offset,
                          lay.strides[:d] + tuple(split) + lay.strides[d + 1 :],
                          ranges[:d] + [(0, n) for n in parts] + ranges[d + 1 :], lay.flat_check, lay.dyn)

    def flatten_dims(self, start_dim, end_dim):
        """Merge dimensions ``start_dim..end_dim`` (inclusive), which must be contiguous in memory."""
        a, b = self._dim(start_dim, "flatten_dims"), self._dim(end_dim, "flatten_dims")
        if b < a:
            raise NKIError(f"flatten_dims: end_dim {end_dim} before start_dim {start_dim}")
        self._partition_kept("flatten_dims", a > 0 or a == b)
        lay = self._layout()
        self._whole("flatten_dims", lay, range(a, b + 1))
        for k in range(a, b):
            if self.shape[k] != 1 and lay.strides[k] != lay.strides[k + 1] * self.shape[k + 1]:
                raise NKIError(f"flatten_dims({a}, {b}): dimensions of {self.describe()} are not contiguous in memory "
                               f"(pattern {self.get_pattern()})")
        ranges = self._ranges(lay)
        n = math.prod(self.shape[a : b + 1])
        return self._view(self.shape[:a] + (n,) + self.shape[b + 1 :], lay.offset,
                          lay.strides[:a] + (lay.strides[b],) + lay.strides[b + 1 :],
                          ranges[:a] + [(0, n)] + ranges[b + 1 :], lay.flat_check, lay.dyn)

    def reshape(self, shape, *more):
        """Same elements, new shape, no copy; fails where the view's layout cannot express it."""
        shape = (shape,) + more if more else shape
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        new = _infer(tuple(_int(s, "reshape size") for s in shape), self.size, "reshape")
        lay = self._layout()
        keep0 = self.alloc.on_chip or (lay.dyn is not None and lay.dyn.vector)
        if keep0 and new[0] != self.shape[0]:
            self._partition_kept(f"reshape to {list(new)}", False, lay)
        if new == self.shape:
            return self
        self._whole("reshape", lay, range(self.ndim))
        first = 1 if keep0 else 0
        strides = _reshape_strides(self.shape[first:], lay.strides[first:], new[first:])
        if strides is None:
            raise NKIError(f"reshape of {self.describe()} (pattern {self.get_pattern()}) to {list(new)}: its layout "
                           "cannot be walked with one stride per dimension")
        strides = lay.strides[:first] + strides
        return self._view(new, lay.offset, strides, None, lay.flat_check, lay.dyn)

    def rearrange(self, src_pattern, dst_pattern, fixed_sizes=None):
        """einops-style: ``t.rearrange(('b', ('h', 'w')), ('b', 'w', 'h'), {'h': 4})``."""
        fixed = dict(fixed_sizes or {})
        src = [g if isinstance(g, tuple) else (g,) for g in src_pattern]
        dst = [g if isinstance(g, tuple) else (g,) for g in dst_pattern]
        if len(src) != self.ndim:
            raise NKIError(f"rearrange: source pattern {src_pattern} has {len(src)} dims, tensor has {self.ndim}")
        names = [n for g in src for n in g]
        if sorted(names) != sorted(n for g in dst for n in g) or len(set(names)) != len(names):
            raise NKIError(f"rearrange: {src_pattern} and {dst_pattern} must name the same dimensions once each")
        t = self
        for d in reversed(range(len(src))):  # split grouped source dims, last first so indices hold
            if len(src[d]) > 1:
                t = t.reshape_dim(d, tuple(fixed.get(n, -1) for n in src[d]))
        t = t.permute(tuple(names.index(n) for g in dst for n in g))
        d = 0
        for g in dst:  # merge grouped destination dims
            if len(g) > 1:
                t = t.flatten_dims(d, d + len(g) - 1)
            d += 1
        return t

    # ---- access patterns --------------------------------------------------------------------
    def ap(self, pattern, offset=None, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None):
        """Access pattern: ``pattern=[[step, count], ...]`` over the allocation's row-major elements,
        from this view's offset (plus ``offset``).

        ``scalar_offset`` (a [1, 1] SBUF int or a register) or ``vector_offset`` (an [n, 1] SBUF
        int, one per element of the first pattern entry, replacing its step) adds a runtime index
        along ``indirect_dim`` of the allocation, whose stride comes from the allocation's shape.
        """
        lay = self._layout()
        if lay.dyn is not None or lay.valid is not None:
            raise NKIError(f"an access pattern cannot be taken of {self.describe()}, which has a runtime index or "
                           "reaches outside its tensor")
        if dtype is not None and dtypes.as_dtype(dtype) != self.dtype:
            raise NKIError("reinterpreting a tensor through .ap(dtype=...) is not supported by the interpreter")
        try:
            pat = [(int(step), int(count)) for step, count in pattern]
        except (TypeError, ValueError):
            raise NKIError(f"pattern must be a list of [step, count] pairs, got {pattern!r}") from None
        if not pat or any(c < 1 for _, c in pat):
            raise NKIError(f"pattern {pattern!r}: every count must be >= 1")
        start = lay.offset + (0 if offset is None else _int(offset, "ap offset"))
        if scalar_offset is not None and vector_offset is not None:
            raise NKIError("at most one of scalar_offset and vector_offset may be given")
        base = self.alloc.data.shape
        if not 0 <= indirect_dim < len(base):
            raise NKIError(f"indirect_dim {indirect_dim} out of range for {self.describe()}")
        if self.alloc.on_chip:
            free = math.prod(base[1:])
            if pat[0][0] != free:
                raise NKIError(
                    f"{self.describe()}: the first pattern entry walks partitions and must step by the free size "
                    f"{free}, got {pat[0][0]} (partition access is contiguous)"
                )
        shape, steps = [c for _, c in pat], [s for s, _ in pat]
        dyn = None
        stride = c_strides(base)[indirect_dim]
        if scalar_offset is not None:
            _check_index_tile(scalar_offset, (1, 1), "scalar_offset")
            dyn = Dynamic(scalar_offset, False, stride, coord_dim=indirect_dim, what="scalar_offset")
        elif vector_offset is not None:
            _check_index_tile(vector_offset, (pat[0][1], 1), "vector_offset")
            steps[0] = 0  # each row starts at its own runtime offset instead
            dyn = Dynamic(vector_offset, True, stride, coord_dim=indirect_dim, what="vector_offset")
        lo = start + sum(min(0, s * (c - 1)) for s, c in zip(steps, shape))
        hi = start + sum(max(0, s * (c - 1)) for s, c in zip(steps, shape))
        return self._view(shape, start, steps, None, not (lo >= 0 and hi < self.alloc.data.size), dyn)

    def view(self, dtype):  # noqa: ARG002
        raise NKIError("reinterpreting a tensor as another dtype (.view / .reinterpret_cast) is not supported by the "
                       "interpreter")

    reinterpret_cast = view

    def indirect(self, index, num_elem=None):  # noqa: ARG002
        raise NKIError("tensor indirection (.indirect, NeuronCore-v4) is not supported by the interpreter")

    # ---- resolution (called by instructions) -------------------------------------------------
    def resolve(self, read_offset) -> Selector:
        """The elements this view touches now. ``read_offset(tensor, role)`` reads a runtime index tile."""
        if self._kind == "full":
            return Selector(self.shape, key=())
        lay = self._spec
        if lay.dyn is None and lay.valid is None and not lay.flat_check:
            return Selector(self.shape, strided=(lay.offset, lay.strides))
        flat = lay.offset + _walk_offsets(self.shape, lay.strides)
        valid = np.ones(self.shape, dtype=bool)
        if lay.valid is not None:
            for d, (lo, hi) in enumerate(lay.valid):
                k = np.arange(self.shape[d])
                valid &= ((k >= lo) & (k < hi)).reshape((-1,) + (1,) * (self.ndim - d - 1))
        size, base = self.alloc.data.size, self.alloc.data.shape
        if lay.flat_check:
            valid &= (flat >= 0) & (flat < size)
        dyn = lay.dyn
        if dyn is not None:
            if isinstance(dyn.index, VirtualRegister):
                v = np.int64(dyn.index.read())
            else:
                v = read_offset(dyn.index, dyn.what).astype(np.int64)
                v = v.reshape((-1,) + (1,) * (self.ndim - 1)) if dyn.vector else v.reshape(-1)[0]
            if dyn.coord_dim is not None:
                coords = list(np.unravel_index(np.clip(flat, 0, size - 1), base))
                c = coords[dyn.coord_dim] + v
                valid &= (c >= 0) & (c < base[dyn.coord_dim])
                flat = flat + v * dyn.stride
            else:
                valid &= (v >= 0) & (v < dyn.bound)
                flat = flat + v * dyn.stride
            valid &= (flat >= 0) & (flat < size)
        flat = np.where(valid, flat, 0).astype(np.int64)
        return Selector(self.shape, flat=np.broadcast_to(flat, self.shape).copy(), valid=None if valid.all() else valid)


def _check_index_tile(t, shape, what: str) -> None:
    if isinstance(t, VirtualRegister):
        if shape != (1, 1):
            raise NKIError(f"{what} must be an [n, 1] SBUF integer tile, got a register")
        return
    if not hasattr(t, "alloc"):
        raise NKIError(f"{what} must be an SBUF integer tensor or a register, got {type(t).__name__}")
    if t.dtype.kind not in "iu":
        raise NKIError(f"{what} must hold integers, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise NKIError(f"{what} must be {list(shape)}, got {list(t.shape)}")
    if shape is None and (len(t.shape) != 2 or t.shape[1] != 1):
        raise NKIError(f"{what} must be [n, 1] (one index per row), got {list(t.shape)}")


def _infer(shape: tuple, total: int, op: str) -> tuple:
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise NKIError(f"{op}: invalid shape {list(shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or total % known:
            raise NKIError(f"{op}: cannot infer -1 in {list(shape)} for {total} elements")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        raise NKIError(f"{op}: {list(shape)} holds {math.prod(shape)} elements, not {total}")
    return shape


def _reshape_strides(old_shape, old_strides, new_shape):
    """Strides walking ``new_shape`` over the same elements as (old_shape, old_strides) in row-major
    order, or None where no single stride per dimension does (NumPy's no-copy reshape rule)."""
    old = [(n, s) for n, s in zip(old_shape, old_strides) if n != 1]
    new_strides = [0] * len(new_shape)
    i = j = 0
    ni, nj = len(old), len(new_shape)
    while i < ni and j < nj:
        if new_shape[j] == 1:
            j += 1
            continue
        i0, j0 = i, j
        a, b = old[i][0], new_shape[j]
        while a != b:
            if a < b:
                i += 1
                a *= old[i][0]
            else:
                j += 1
                b *= new_shape[j]
        for k in range(i0, i):  # the merged old dims must be contiguous with each other
            if old[k][1] != old[k + 1][1] * old[k + 1][0]:
                return None
        new_strides[j] = old[i][1]
        for k in range(j, j0, -1):
            new_strides[k - 1] = new_strides[k] * new_shape[k]
        i += 1
        j += 1
    return tuple(new_strides)
