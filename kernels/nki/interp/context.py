"""The state of one interpreted kernel call: target, on-chip memory in use, loop scopes,
instruction and DMA counters, and the seeded random order of affine loops."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import dtypes
from .errors import NKIError, NKIRuleError
from .hazards import AffineLoop
from .tensor import HBM, PMAX, PSUM, SBUF, Allocation, Selector, Tensor

PSUM_BANK_BYTES = 2048  # 512 fp32 per partition
PSUM_BANKS = 8  # 16 KiB per partition


@dataclass(frozen=True)
class Target:
    name: str
    sbuf_partition_bytes: int


TARGETS = {"trn1": Target("trn1", 192 * 1024), "trn2": Target("trn2", 224 * 1024)}
ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")


@dataclass
class RunStats:
    """What one kernel call did: instructions per engine and per op, bytes moved by DMA."""

    target: str
    instructions: Counter = field(default_factory=Counter)  # engine -> count
    ops: Counter = field(default_factory=Counter)  # instruction name -> count
    dma_bytes: int = 0  # all bytes moved by DMA instructions
    hbm_read_bytes: int = 0  # of which read from HBM
    hbm_write_bytes: int = 0  # of which written to HBM
    sbuf_peak_partition_bytes: int = 0
    psum_peak_banks: int = 0

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "instructions": {e: self.instructions.get(e, 0) for e in ENGINES},
            "instructions_total": sum(self.instructions.values()),
            "ops": dict(sorted(self.ops.items())),
            "dma_bytes": self.dma_bytes,
            "hbm_read_bytes": self.hbm_read_bytes,
            "hbm_write_bytes": self.hbm_write_bytes,
            "sbuf_peak_partition_bytes": self.sbuf_peak_partition_bytes,
            "psum_peak_banks": self.psum_peak_banks,
        }


class Context:
    def __init__(self, target: str = "trn1", seed: int = 0, check_affine: bool = True):
        if target not in TARGETS:
            raise NKIError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
        self.target = TARGETS[target]
        self.rng = np.random.default_rng(seed)
        self.check_affine = check_affine
        self.stats = RunStats(target)
        self.scopes: list[list[Allocation]] = [[]]
        self.sbuf_used = 0  # bytes per partition
        self.psum_used = 0  # banks
        self.affine: list[AffineLoop] = []
        self.grid: tuple = ()
        self.program_id: tuple = ()
        self.shared_outputs: list[Allocation] = []  # shared_hbm tensors, shared by SPMD programs
        self._shared_cursor = 0
        self._next_id = 0

    # ---- allocation and lifetime ------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def wrap_input(self, arr: np.ndarray, name: str) -> Tensor:
        data = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        dtypes.as_dtype(data.dtype)
        return Tensor(Allocation(data, HBM, name, 0, None, self._new_id()), data.shape)

    def allocate(self, shape, dtype, buffer: str, name: str = "", shared: bool = False) -> Tensor:
        dt = dtypes.as_dtype(dtype)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise NKIError(f"shape must be a tuple of integers, got {shape!r}") from None
        if not shape or any(s < 1 for s in shape):
            raise NKIError(f"shape {shape} must have at least one axis, each >= 1")
        if shared and self._shared_cursor < len(self.shared_outputs):  # a later SPMD program
            alloc = self.shared_outputs[self._shared_cursor]
            self._shared_cursor += 1
            if alloc.data.shape != shape or alloc.dtype != dt:
                raise NKIError("SPMD programs must allocate the same shared_hbm tensors in the same order")
            return Tensor(alloc, shape)
        name = name or f"{buffer}{self._next_id + 1}"
        if buffer == HBM:
            data = np.full(shape, dtypes.fill_value(dt), dtype=dt)
            alloc = Allocation(data, HBM, name, 0, np.zeros(shape, dtype=bool), self._new_id())
            if shared:
                self.shared_outputs.append(alloc)
                self._shared_cursor += 1
            return Tensor(alloc, shape)
        if len(shape) < 2:
            raise NKIError(f"on-chip tensor {name} must be at least 2-D (axis 0 is the partition axis), got {shape}")
        if shape[0] > PMAX:
            raise NKIRuleError(1, f"{buffer.upper()} tensor {name} {list(shape)} has {shape[0]} partitions > {PMAX}")
        part_bytes = math.prod(shape[1:]) * dt.itemsize
        alloc = Allocation(np.full(shape, dtypes.fill_value(dt), dtype=dt), buffer, name, len(self.scopes) - 1,
                           np.zeros(shape, dtype=bool), self._new_id())
        if buffer == PSUM:
            if part_bytes > PSUM_BANK_BYTES:
                raise NKIRuleError(
                    2, f"PSUM tile {name} {list(shape)} {dt} needs {part_bytes} B per partition > one bank of {PSUM_BANK_BYTES} B"
                )
            banks = -(-part_bytes // PSUM_BANK_BYTES)
            if self.psum_used + banks > PSUM_BANKS:
                raise NKIRuleError(
                    2, f"allocating {name} needs PSUM bank {self.psum_used + banks} of {PSUM_BANKS} (16 KiB per partition): "
                    f"too many PSUM tiles live at once"
                )
            alloc.psum_banks = banks
            self.psum_used += banks
            self.stats.psum_peak_banks = max(self.stats.psum_peak_banks, self.psum_used)
        else:
            cap = self.target.sbuf_partition_bytes
            if self.sbuf_used + part_bytes > cap:
                raise NKIRuleError(
                    3, f"allocating {name} {list(shape)} {dt} ({part_bytes} B per partition) brings live SBUF to "
                    f"{self.sbuf_used + part_bytes} B > {cap} B per partition on {self.target.name}"
                )
            alloc.partition_bytes = part_bytes
            self.sbuf_used += part_bytes
            self.stats.sbuf_peak_partition_bytes = max(self.stats.sbuf_peak_partition_bytes, self.sbuf_used)
        self.scopes[-1].append(alloc)
        return Tensor(alloc, shape)

    def open_scope(self) -> None:
        self.scopes.append([])

    def close_scope(self) -> None:
        for alloc in self.scopes.pop():
            alloc.live = False
            self.sbuf_used -= alloc.partition_bytes
            self.psum_used -= alloc.psum_banks

    # ---- loops ------------------------------------------------------------------------------
    def loop(self, indices: list[int], affine: bool):
        """Run a loop body once per index, each iteration in its own allocation scope."""
        order = list(indices)
        tracker = None
        if affine:
            self.rng.shuffle(order)
            if self.check_affine and len(order) > 1:  # one iteration carries nothing
                tracker = AffineLoop(body_depth=len(self.scopes))
                self.affine.append(tracker)
        try:
            for i in order:
                self.open_scope()
                if tracker is not None:
                    tracker.iteration = i
                try:
                    yield i
                finally:
                    self.close_scope()
        finally:
            if tracker is not None:
                self.affine.remove(tracker)

    # ---- operands ---------------------------------------------------------------------------
    def count(self, engine: str, op: str) -> None:
        self.stats.instructions[engine] += 1
        self.stats.ops[op] += 1

    def operand(self, t, op: str, role: str, mode: str = "r", on_chip: bool = True, allow_oob: bool = False,
                must_be_written: bool | None = None) -> Selector:
        """Check one operand of an instruction and return the elements it touches."""
        if not isinstance(t, Tensor):
            raise NKIError(f"{op}: {role} must be an NKI tensor, got {type(t).__name__}")
        alloc = t.alloc
        if on_chip and not alloc.on_chip:
            raise NKIRuleError(5, f"{op} is a compute instruction; its {role} {t.describe()} is in HBM (only DMA touches HBM)")
        if not alloc.live:
            raise NKIRuleError(
                3, f"{op} uses {t.describe()} after the loop iteration that allocated it ended "
                "(a tensor allocated inside a loop body lives for one iteration)"
            )
        sel = t.resolve(lambda ot, r: self.read(ot, f"{op} {role}.{r}"))
        if not sel.all_valid and not allow_oob:
            raise NKIError(f"{op}: {role} {t.describe()} reaches outside its tensor")
        if (mode == "r" if must_be_written is None else must_be_written) and alloc.written is not None:
            seen = sel.in_bounds().get(alloc.written)
            if not seen.all():
                raise NKIRuleError(
                    9, f"{op} reads {role} {t.describe()}, where {int(seen.size - seen.sum())} of {seen.size} "
                    "elements were never written (fresh allocations hold NaN/sentinel values)"
                )
        for tracker in self.affine:
            tracker.access(alloc, sel, mode, f"{op} ({role})")
        return sel

    def read(self, t: Tensor, op: str, role: str = "operand") -> np.ndarray:
        """Values of an on-chip operand, in its own dtype, shaped like the view."""
        return self.operand(t, op, role).get(t.alloc.data)

    def write(self, t: Tensor, values, op: str, role: str = "dst") -> None:
        """Write computed values into an on-chip destination (cast to its dtype, rule 11)."""
        sel = self.operand(t, op, role, mode="w")
        self.store(t, sel, values)

    def store(self, t: Tensor, sel: Selector, values) -> None:
        vals = dtypes.cast(values, t.dtype)
        if np.ndim(vals) and vals.size != math.prod(sel.shape):
            raise NKIError(f"cannot write {vals.size} values into {t.describe()} of shape {list(sel.shape)}")
        sel.set(t.alloc.data, vals.reshape(sel.shape) if np.ndim(vals) else vals)
        if t.alloc.written is not None:
            sel.set(t.alloc.written, True)


_stack: list[Context] = []


def current() -> Context:
    if not _stack:
        raise NKIError("NKI instructions run only inside a kernel called through nki.simulate / a jit kernel")
    return _stack[-1]


def push(ctx: Context) -> None:
    _stack.append(ctx)


def pop() -> None:
    _stack.pop()
