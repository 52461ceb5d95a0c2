"""The state of one interpreted kernel call: the target, the on-chip memory held by live tiles,
which values are undefined (rule 9), instruction and DMA counters, and the opt-in parallel-loop
lint (rule 10).

Liveness: a tile lives while the kernel references it (a weak-reference finalizer gives its
bytes back when the last view of it goes away), so SBUF and PSUM capacity is counted over live
tiles only, as the NKI compiler allocates them.

Undefined values: fresh memory holds NaN or a sentinel and may be read (rule 9). Each
instruction's destination elements are marked undefined where they were computed from
undefined inputs (elementwise for same-sized operands, per partition for [P, 1] operands,
free-axis reductions and scans, by row and column for matmul, transposed for nc_transpose, and
wholesale where partitions move by data); a check after the kernel reports outputs holding
undefined elements.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import dtypes
from .errors import NKIError, NKIRuleError
from .hazards import ParallelLoop
from .tensor import HBM, PMAX, PSUM, SBUF, Allocation, Selector, Tensor
from .selector import VirtualRegister


@dataclass(frozen=True)
class Target:
    """One NeuronCore generation (numbers from AWS's NKI architecture guides; see docs/nki.md)."""

    name: str
    neuron_core: str
    nc_version: int
    sbuf_partition_bytes: int  # SBUF: 128 partitions of this many bytes
    psum_partition_bytes: int = 16 * 1024  # PSUM: 128 partitions of 16 KiB (2 MiB) ...
    psum_bank_bytes: int = 2 * 1024  # ... in 8 banks of 2 KiB (512 fp32)
    engines: tuple = ("tensor", "vector", "scalar", "gpsimd", "sync")

    @property
    def psum_banks(self) -> int:
        return self.psum_partition_bytes // self.psum_bank_bytes


# NKI 0.6 supports Trainium2 and Trainium3 only (AWS's NKI FAQ).
TARGETS = {
    "trn2": Target("trn2", "NeuronCore-v3", 3, 224 * 1024),  # SBUF 28 MiB = 128 x 224 KiB, PSUM 2 MiB
    "trn3": Target("trn3", "NeuronCore-v4", 4, 256 * 1024),  # SBUF 32 MiB = 128 x 256 KiB, PSUM 2 MiB
}
DEFAULT_TARGET = "trn2"
PSUM_BANK_BYTES = 2048
ENGINES = ("tensor", "vector", "scalar", "gpsimd", "sync", "dma")  # instruction counters (sync: registers, loops)
CHECK_OUTPUTS = ("error", "warn", "off")


@dataclass
class RunStats:
    """What one kernel call did: instructions per engine and per op, bytes moved by DMA."""

    target: str
    instructions: Counter = field(default_factory=Counter)  # engine -> count
    ops: Counter = field(default_factory=Counter)  # instruction name -> count (register and loop ops too)
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


def _undefined(alloc: Allocation, sel: Selector, unwritten: bool) -> np.ndarray | None:
    """Which of the selected elements hold no defined value (None: all defined)."""
    if alloc.tainted is None and (alloc.written is None or not unwritten):
        return None
    bad = ~sel.get(alloc.written) if unwritten and alloc.written is not None else None
    if alloc.tainted is not None:
        t = sel.get(alloc.tainted)
        bad = t if bad is None else bad | t
    if sel.valid is not None:
        bad = bad & sel.valid  # out-of-bounds elements are not read
    return bad if bad.any() else None


SCANS = frozenset({"tensor_tensor_scan", "tensor_scalar_cumulative"})
PARTITION_MOVES = frozenset({"nc_stream_shuffle", "local_gather", "nc_n_gather", "dma_transpose"})


def _spread(op: str, role: str, bad: np.ndarray, shape: tuple) -> np.ndarray:
    """Which destination elements an operand's undefined elements reach."""
    size, parts = math.prod(shape), shape[0]
    if op == "nc_matmul" and role in ("stationary", "moving"):
        cols = bad.reshape(bad.shape[0], -1).any(axis=0)  # per stationary column m / moving column n
        out = np.zeros((parts, size // parts), bool)
        if role == "stationary":
            out[cols, :] = True
        else:
            out[:, cols] = True
        return out.reshape(shape)
    if op == "nc_transpose" and role == "data" and bad.size == size:
        return bad.reshape(bad.shape[0], -1).T.reshape(shape)
    if op in SCANS and bad.shape[0] == parts:  # an element depends on the partition's earlier ones
        return _per_partition(bad, shape)
    if op in PARTITION_MOVES:  # which partition lands where is data: assume any
        return np.full(shape, bool(bad.any()))
    if bad.size == size:
        return bad.reshape(shape)  # elementwise, in row-major order of the two views
    if bad.shape[0] == parts:  # a [P, 1] operand, or a reduction along the free axes
        return _per_partition(bad, shape)
    return np.full(shape, bool(bad.any()))


def _per_partition(bad: np.ndarray, shape: tuple) -> np.ndarray:
    rows = bad.reshape(shape[0], -1).any(axis=1)
    return np.broadcast_to(rows.reshape((shape[0],) + (1,) * (len(shape) - 1)), shape)


class Context:
    def __init__(self, target: str = DEFAULT_TARGET, seed: int = 0, lint_parallel_loops: bool = False,
                 check_outputs: str = "error"):
        if target not in TARGETS:
            raise NKIError(f"unknown target {target!r}; NKI 0.6 supports {sorted(TARGETS)} (Trainium2, Trainium3)")
        if check_outputs not in CHECK_OUTPUTS:
            raise NKIError(f"check_outputs must be one of {CHECK_OUTPUTS}, got {check_outputs!r}")
        self.target = TARGETS[target]
        self.rng = np.random.default_rng(seed)
        self.lint_parallel_loops = lint_parallel_loops
        self.check_outputs = check_outputs
        self.stats = RunStats(target)
        self.sbuf_used = 0  # bytes per partition held by live tiles
        self.psum_used = 0  # banks held by live tiles
        self.parallel_loops: list[ParallelLoop] = []
        self.loop_depth = 0  # linted loops running (their bodies' tiles are private to an iteration)
        self.registers = 0
        self.grid: tuple = ()
        self.program_id: tuple = ()
        self.shared_outputs: list[Allocation] = []  # shared_hbm tensors, shared by SPMD programs
        self._shared_cursor = 0
        self._next_id = 0
        self._reads: list = []  # (op, role, undefined mask) of the running instruction's operands
        self._dsts: set[int] = set()  # allocations the running instruction writes

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
        tgt = self.target
        banks = 0
        if buffer == PSUM:
            if part_bytes > tgt.psum_bank_bytes:
                raise NKIRuleError(2, f"PSUM tile {name} {list(shape)} {dt} needs {part_bytes} B per partition > one bank "
                                      f"of {tgt.psum_bank_bytes} B")
            banks = -(-part_bytes // tgt.psum_bank_bytes)
            if self.psum_used + banks > tgt.psum_banks:
                raise NKIRuleError(2, f"allocating {name} needs PSUM bank {self.psum_used + banks} of {tgt.psum_banks} "
                                      f"({tgt.psum_partition_bytes // 1024} KiB per partition): too many PSUM tiles live at once")
            part_bytes = 0
        elif self.sbuf_used + part_bytes > tgt.sbuf_partition_bytes:
            raise NKIRuleError(3, f"allocating {name} {list(shape)} {dt} ({part_bytes} B per partition) brings live SBUF to "
                                  f"{self.sbuf_used + part_bytes} B > {tgt.sbuf_partition_bytes} B per partition on {tgt.name}")
        alloc = Allocation(np.full(shape, dtypes.fill_value(dt), dtype=dt), buffer, name, self.loop_depth,
                           np.zeros(shape, dtype=bool), self._new_id())
        alloc.partition_bytes, alloc.psum_banks = part_bytes, banks
        self.sbuf_used += part_bytes
        self.psum_used += banks
        self.stats.sbuf_peak_partition_bytes = max(self.stats.sbuf_peak_partition_bytes, self.sbuf_used)
        self.stats.psum_peak_banks = max(self.stats.psum_peak_banks, self.psum_used)
        weakref.finalize(alloc, self._release, part_bytes, banks)  # when the kernel drops its last view
        return Tensor(alloc, shape)

    def _release(self, sbuf_bytes: int, banks: int) -> None:
        self.sbuf_used -= sbuf_bytes
        self.psum_used -= banks

    # ---- the parallel-loop lint (rule 10) ----------------------------------------------------
    def parallel_loop(self, indices):
        """An ``affine_range`` under the lint: seeded shuffled order, dependencies checked."""
        order = list(indices)
        self.rng.shuffle(order)
        tracker = ParallelLoop(body_depth=self.loop_depth + 1) if len(order) > 1 else None  # one iteration carries nothing
        self.loop_depth += 1
        if tracker is not None:
            self.parallel_loops.append(tracker)
        try:
            for i in order:
                if tracker is not None:
                    tracker.iteration = i
                yield i
        finally:
            self.loop_depth -= 1
            if tracker is not None:
                self.parallel_loops.remove(tracker)

    # ---- operands ---------------------------------------------------------------------------
    def count(self, engine: str | None, op: str) -> None:
        """Start an instruction: count it (``engine`` None: a sequencer op, counted in ops only)."""
        if engine is not None:
            self.stats.instructions[engine] += 1
        self.stats.ops[op] += 1
        self._reads, self._dsts = [], set()

    def operand(self, t, op: str, role: str, mode: str = "r", on_chip: bool = True, allow_oob: bool = False,
                must_be_written: bool | None = None, record: bool = True) -> Selector:
        """Check one operand of an instruction and return the elements it touches. ``mode``: "r"
        read, "w" write, "a" accumulate (reads only what was written before, unless
        ``must_be_written``)."""
        if not isinstance(t, Tensor):
            raise NKIError(f"{op}: {role} must be an NKI tensor, got {type(t).__name__}")
        alloc = t.alloc
        if on_chip and not alloc.on_chip:
            raise NKIRuleError(5, f"{op} is a compute instruction; its {role} {t.describe()} is in HBM (only DMA touches HBM)")
        sel = t.resolve(lambda ot, r: self.index_values(ot, f"{op} {role}.{r}"))
        if not sel.all_valid and not allow_oob:
            raise NKIError(f"{op}: {role} {t.describe()} reaches outside its tensor")
        if record and mode != "w":
            bad = _undefined(alloc, sel, unwritten=mode == "r" if must_be_written is None else bool(must_be_written))
            if bad is not None:
                self._reads.append((op, role, bad))
        if record and mode != "r":
            self._dsts.add(alloc.id)
        for tracker in self.parallel_loops:
            tracker.access(alloc, sel, mode, f"{op} ({role})")
        return sel

    def index_values(self, t, what: str, on_chip: bool = True) -> np.ndarray:
        """Values that steer the program (runtime offsets, register loads): they must be defined."""
        if isinstance(t, VirtualRegister):
            return np.array([[t.read()]], dtype=np.int64)
        sel = self.operand(t, what, "index", on_chip=on_chip, record=False)
        bad = _undefined(t.alloc, sel, unwritten=True)
        if bad is not None:
            raise NKIRuleError(9, f"{what}: {t.describe()} supplies a runtime index or bound, but {int(bad.sum())} of its "
                                  f"{bad.size} element(s) were never written (or were computed from never-written memory)")
        return sel.get(t.alloc.data)

    def read(self, t: Tensor, op: str, role: str = "operand") -> np.ndarray:
        """Values of an on-chip operand, in its own dtype, shaped like the view."""
        return self.operand(t, op, role).get(t.alloc.data)

    def write(self, t: Tensor, values, op: str, role: str = "dst") -> None:
        """Write computed values into an on-chip destination (cast to its dtype, rule 11)."""
        sel = self.operand(t, op, role, mode="w")
        self.store(t, sel, values)

    def store(self, t: Tensor, sel: Selector, values) -> None:
        """Write values into the selected elements; they are undefined where the running
        instruction computed them from undefined operands."""
        vals = dtypes.cast(values, t.dtype)
        if np.ndim(vals) and vals.size != math.prod(sel.shape):
            raise NKIError(f"cannot write {vals.size} values into {t.describe()} of shape {list(sel.shape)}")
        alloc = t.alloc
        sel.set(alloc.data, vals.reshape(sel.shape) if np.ndim(vals) else vals)
        if alloc.written is not None:
            sel.set(alloc.written, True)
        bad = None
        if self._reads and alloc.id in self._dsts:
            bad = np.zeros(sel.shape, bool)
            for op, role, mask in self._reads:
                bad |= _spread(op, role, mask, sel.shape)
        self._mark(alloc, sel, bad)

    def copy_elements(self, src: Tensor, src_flat: np.ndarray, dst: Tensor, dst_flat: np.ndarray) -> None:
        """A DMA of single elements (flat indices, in bounds), carrying their definedness along."""
        dst.alloc.data.reshape(-1)[dst_flat] = src.alloc.data.reshape(-1)[src_flat]
        if dst.alloc.written is not None:
            dst.alloc.written.reshape(-1)[dst_flat] = True
        s = src.alloc
        bad = np.zeros(src_flat.shape, bool)
        if s.written is not None:
            bad |= ~s.written.reshape(-1)[src_flat]
        if s.tainted is not None:
            bad |= s.tainted.reshape(-1)[src_flat]
        self._mark(dst.alloc, Selector(dst_flat.shape, flat=dst_flat), bad)

    @staticmethod
    def _mark(alloc: Allocation, sel: Selector, bad: np.ndarray | None) -> None:
        if bad is not None and bad.any():
            if alloc.tainted is None:
                alloc.tainted = np.zeros(alloc.data.shape, dtype=bool)
            sel.set(alloc.tainted, bad)
        elif alloc.tainted is not None:
            sel.set(alloc.tainted, False)

    # ---- the output check (rule 9) -----------------------------------------------------------
    def undefined_outputs(self, tensors) -> list[str]:
        """One line per (label, tensor) holding elements that were never written or were computed
        from never-written memory."""
        lines, seen = [], set()
        for label, t in tensors:
            alloc = t.alloc
            if alloc.id in seen:
                continue
            seen.add(alloc.id)
            unwritten = None if alloc.written is None else ~alloc.written
            bad = unwritten if alloc.tainted is None else alloc.tainted if unwritten is None else unwritten | alloc.tainted
            if bad is None or not bad.any():
                continue
            n_unwritten = 0 if unwritten is None else int(unwritten.sum())
            where = ", ".join(str(list(map(int, i))) for i in np.argwhere(bad)[:4])
            lines.append(
                f"{label} {alloc.name}{list(alloc.data.shape)}: {int(bad.sum())} of {bad.size} elements hold no defined value "
                f"({n_unwritten} never written, {int(bad.sum()) - n_unwritten} computed from never-written memory), "
                f"e.g. at {where}"
            )
        return lines


_stack: list[Context] = []


def current() -> Context:
    if not _stack:
        raise NKIError("NKI instructions run only inside a kernel called through nki.simulate / a jit kernel")
    return _stack[-1]


def current_or_none() -> Context | None:
    return _stack[-1] if _stack else None


def push(ctx: Context) -> None:
    _stack.append(ctx)


def pop() -> None:
    _stack.pop()
