"""Tensors of the NKI interpreter: allocations in HBM/SBUF/PSUM and the tensors kernels hold,
each the whole of an allocation or a view of it (views.py).

A view never copies. Each instruction resolves its operands into a :class:`Selector` (which
elements of the allocation, and whether each is in bounds) at the moment it runs, so an
access pattern with a runtime offset reads that offset's current value.
"""

from __future__ import annotations

import numpy as np

from .errors import NKIError
from .views import Selector, ViewMethods, VirtualRegister  # noqa: F401 - re-exported

SBUF, PSUM, HBM = "sbuf", "psum", "hbm"
PMAX = 128  # partitions of SBUF and PSUM


class Allocation:
    """One buffer: its data (C-contiguous), which elements were written, and its lifetime."""

    __slots__ = ("id", "data", "written", "tainted", "buffer", "name", "depth", "live", "partition_bytes", "psum_banks",
                 "__weakref__")  # a weak reference tells the context when the kernel dropped its last view

    def __init__(self, data: np.ndarray, buffer: str, name: str, depth: int, written: np.ndarray | None, aid: int):
        self.id = aid
        self.data = data
        self.written = written  # None: every element counts as written (kernel inputs)
        self.tainted = None  # bool mask: computed from never-written memory (None: no such element)
        self.buffer = buffer
        self.name = name
        self.depth = depth  # linted parallel loops running at allocation (rule 10's private tiles)
        self.live = True
        self.partition_bytes = 0
        self.psum_banks = 0

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def on_chip(self) -> bool:
        return self.buffer != HBM


class Tensor(ViewMethods):
    """A view of an :class:`Allocation`: the whole of it, or a view (views.py: slices, view methods,
    access patterns)."""

    __slots__ = ("alloc", "shape", "_kind", "_spec")

    def __init__(self, alloc: Allocation, shape, kind: str = "full", spec=None):
        self.alloc = alloc
        self.shape = tuple(int(s) for s in shape)
        self._kind = kind  # "full" | "view"
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
