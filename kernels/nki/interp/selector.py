"""What an instruction touches: a :class:`Selector` (the elements of an allocation one operand
reaches now, and which are in bounds), and :class:`VirtualRegister` (a runtime integer that a
view's runtime index may come from)."""

from __future__ import annotations

import math

import numpy as np

from .errors import NKIError


class Selector:
    """The elements of an allocation that one operand touches, in the operand's shape."""

    __slots__ = ("key", "flat", "valid", "shape", "strided")

    def __init__(self, shape, key=None, flat=None, valid=None, strided=None):
        self.shape = tuple(shape)
        self.key = key  # NumPy basic index into the allocation, or None
        self.flat = flat  # int64 flat indices [shape] (clipped into range where invalid)
        self.valid = valid  # bool [shape] or None when all are in bounds
        self.strided = strided  # (offset, strides) in elements: an in-bounds strided walk

    @property
    def all_valid(self) -> bool:
        return self.valid is None

    def _walk(self, arr: np.ndarray) -> np.ndarray:
        offset, strides = self.strided
        base = arr.reshape(-1)[offset:]
        return np.lib.stride_tricks.as_strided(base, self.shape, [s * arr.itemsize for s in strides])

    def get(self, arr: np.ndarray) -> np.ndarray:
        if self.strided is not None:
            return self._walk(arr).copy()
        if self.key is not None:
            return arr[self.key].reshape(self.shape)
        return arr.reshape(-1)[self.flat]

    def set(self, arr: np.ndarray, values) -> None:
        if self.strided is not None:
            self._walk(arr)[...] = values
        elif self.key is not None:
            arr[self.key] = np.reshape(values, arr[self.key].shape) if np.ndim(values) else values
        else:
            arr.reshape(-1)[self.flat] = values

    def flat_indices(self, base_shape) -> np.ndarray:
        """Flat (row-major) indices into the allocation, in the operand's shape."""
        if self.flat is not None:
            return self.flat
        if self.strided is not None:
            offset, strides = self.strided
            return offset + _walk_offsets(self.shape, strides)
        return np.arange(math.prod(base_shape), dtype=np.int64).reshape(base_shape)[self.key].reshape(self.shape)

    def in_bounds(self) -> "Selector":
        """The same selector restricted to its in-bounds elements (flattened)."""
        if self.valid is None:
            return self
        return Selector((int(self.valid.sum()),), flat=self.flat[self.valid])


class VirtualRegister:
    """``nisa.register_alloc()``: a 32-bit engine register holding a runtime integer."""

    __slots__ = ("value", "name")

    def __init__(self, value=None, name: str = ""):
        self.value = value
        self.name = name

    def read(self) -> int:
        if self.value is None:
            raise NKIError(f"register {self.name or ''} is read before anything was moved or loaded into it".replace("  ", " "))
        return self.value

    def __repr__(self) -> str:
        return f"<nki register {self.name} = {self.value}>"

    def _no_value(self, *_):
        raise NKIError("a register holds a runtime value: it cannot drive Python control flow inside a kernel "
                       "(use nl.fori_loop / nl.while_loop)")

    __bool__ = __index__ = __int__ = _no_value


def _walk_offsets(shape, strides) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    for d, (n, s) in enumerate(zip(shape, strides)):
        if s and n > 1:
            out += (np.arange(n, dtype=np.int64) * s).reshape((n,) + (1,) * (len(shape) - d - 1))
    return out


def c_strides(shape) -> tuple:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))
