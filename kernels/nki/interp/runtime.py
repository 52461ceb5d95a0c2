"""``nki.jit`` and ``nki.simulate``: run a kernel function on NumPy arrays.

The kernel body runs as plain Python against this package's ``nki.language``/``nki.isa``, the
way AWS's own CPU simulator runs it. Array arguments become HBM tensors (no copy, so a kernel
that writes an input in place writes the caller's array, if it is C-contiguous); other
arguments (ints, floats) are compile-time constants. What the kernel returns (HBM tensors) comes
back as NumPy arrays.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np

from . import context
from .context import DEFAULT_TARGET, Context, RunStats
from .errors import NKIError, NKIRuleError
from .tensor import HBM, Tensor


@dataclass(frozen=True)
class Options:
    """How the interpreter runs.

    ``target``: ``trn2`` (default) or ``trn3``, the on-chip memory sizes checked.
    ``lint_parallel_loops``: check ``affine_range`` loops as older NKI's parallel loops (seeded
    shuffled order, loop-carried dependencies raise rule 10), stricter than NKI 0.6; ``seed``
    orders them.
    ``check_outputs``: what to do when a kernel output (or an input written in place) holds
    elements never written or computed from never-written memory: ``"error"`` (rule 9),
    ``"warn"`` (:class:`UndefinedOutputWarning`, the values come back as NaN/sentinel), ``"off"``.
    """

    target: str = DEFAULT_TARGET
    seed: int = 0
    lint_parallel_loops: bool = False
    check_outputs: str = "error"


class UndefinedOutputWarning(RuntimeWarning):
    """A kernel output holds values nothing defined (``check_outputs="warn"``)."""


_defaults = Options()
_last_stats: list[RunStats | None] = [None]


def set_defaults(**kwargs) -> Options:
    """Change the default options of later runs (e.g. ``set_defaults(target="trn2")``); return
    the previous defaults, so ``set_defaults(**old.__dict__)`` restores them."""
    global _defaults
    old = _defaults
    _defaults = Options(**{**_defaults.__dict__, **kwargs})
    return old


def last_stats() -> RunStats | None:
    """Counters of the most recent kernel call (instructions per engine, DMA bytes)."""
    return _last_stats[0]


class Kernel:
    """A kernel function marked with ``@nki.jit``; ``kernel[grid]`` launches an SPMD grid."""

    def __init__(self, fn, grid: tuple = ()):
        self.fn = fn
        self.grid = grid
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __getitem__(self, grid) -> "Kernel":
        grid = grid if isinstance(grid, tuple) else (grid,)
        if not grid or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
            raise NKIError(f"launch grid must be positive integers, got {grid!r}")
        return Kernel(self.fn, tuple(int(g) for g in grid))

    def __call__(self, *args, **kwargs):
        return run(self, args, kwargs, _defaults)

    def __repr__(self) -> str:
        return f"<nki kernel {self.__name__}{list(self.grid) if self.grid else ''}>"


def jit(fn=None, **_options):
    """Mark a kernel function (``@nki.jit`` or ``@nki.jit(...)``)."""
    if fn is None:
        return lambda f: Kernel(f)
    return fn if isinstance(fn, Kernel) else Kernel(fn)


class Simulation:
    """``nki.simulate(kernel)``: calling it runs the kernel; ``.stats`` holds that run's counters."""

    def __init__(self, kernel: Kernel, options: Options):
        self.kernel = kernel
        self.options = options
        self.stats: RunStats | None = None

    def __call__(self, *args, **kwargs):
        out = run(self.kernel, args, kwargs, self.options)
        self.stats = last_stats()
        return out


def simulate(kernel, *, target: str | None = None, seed: int | None = None, lint_parallel_loops: bool | None = None,
             check_outputs: str | None = None) -> Simulation:
    """Run ``kernel`` on the CPU through the interpreter. Keyword options override the defaults."""
    kernel = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    given = {k: v for k, v in (("target", target), ("seed", seed), ("lint_parallel_loops", lint_parallel_loops),
                               ("check_outputs", check_outputs)) if v is not None}
    return Simulation(kernel, Options(**{**_defaults.__dict__, **given}))


def run(kernel: Kernel, args, kwargs, options: Options):
    ctx = Context(options.target, options.seed, options.lint_parallel_loops, options.check_outputs)
    context.push(ctx)
    try:
        wrapped_args = [_wrap(ctx, a, f"arg{i}") for i, a in enumerate(args)]
        wrapped_kwargs = {k: _wrap(ctx, v, k) for k, v in kwargs.items()}
        ctx.grid = kernel.grid
        result = None
        programs = itertools.product(*[range(g) for g in kernel.grid]) if kernel.grid else [()]
        for pid in programs:
            ctx.program_id = pid
            ctx._shared_cursor = 0
            result = kernel.fn(*wrapped_args, **wrapped_kwargs)
        _check_outputs(ctx, result, wrapped_args, wrapped_kwargs)
        return _unwrap(result)
    finally:
        context.pop()
        _last_stats[0] = ctx.stats


def _check_outputs(ctx: Context, result, args, kwargs) -> None:
    """Rule 9's check: outputs, and inputs the kernel wrote in place, hold only defined values."""
    if ctx.check_outputs == "off":
        return
    labelled = [(f"output {i}", t) for i, t in enumerate(_tensors(result))]
    labelled += [(f"input {t.name} (written in place)", t) for t in _tensors(list(args) + list(kwargs.values()))]
    lines = ctx.undefined_outputs(labelled)
    if not lines:
        return
    text = "; ".join(lines) + " (fresh memory holds NaN/sentinel values; check_outputs='warn' or 'off' returns them)"
    if ctx.check_outputs == "error":
        raise NKIRuleError(9, text)
    warnings.warn(text, UndefinedOutputWarning, stacklevel=4)


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _wrap(ctx: Context, value, name: str):
    if isinstance(value, np.ndarray):
        return ctx.wrap_input(value, name)
    if isinstance(value, (list, tuple)) and any(isinstance(v, np.ndarray) for v in value):
        return type(value)(_wrap(ctx, v, f"{name}[{i}]") for i, v in enumerate(value))
    return value


def _unwrap(result):
    if result is None:
        return None
    if isinstance(result, Tensor):
        if result.buffer != HBM:
            raise NKIError(f"a kernel returns HBM tensors; {result.describe()} is on chip (store it to an nl.shared_hbm tensor)")
        return result.alloc.data
    if isinstance(result, (list, tuple)):
        return type(result)(_unwrap(r) for r in result)
    raise NKIError(f"a kernel returns HBM tensors, got {type(result).__name__}")
