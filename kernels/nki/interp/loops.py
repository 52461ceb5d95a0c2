"""Loops of NKI 0.6 and the registers that drive its runtime loops.

* ``static_range``, ``affine_range``, ``sequential_range``: aliases of Python's ``range`` (the
  latter two deprecated), unrolled while the kernel is traced, so they run in order. The older
  "parallel loop" meaning of ``affine_range`` survives only as an opt-in lint that is stricter
  than NKI: ``nki.simulate(kernel, lint_parallel_loops=True)`` runs ``affine_range`` iterations
  in a seeded shuffled order and flags loop-carried dependencies (rule 10, hazards.py).
* ``fori_loop(lower, upper, body_fun, step=1)`` and ``while_loop(init, body_fun)``: loops that
  run on the device, with bounds or a condition held in registers; ``dynamic_range`` is the
  deprecated iterator form. Their bodies get the induction (or condition) value as a
  :class:`VirtualRegister`, which addresses memory (``.ap(scalar_offset=i)``) but cannot steer
  Python control flow (registers themselves: ``nisa.register_alloc`` and friends, isa_dma.py).
"""

from __future__ import annotations

import warnings

import numpy as np

from .context import current, current_or_none
from .errors import NKIError
from .tensor import Tensor
from .selector import VirtualRegister

MAX_WHILE_ITERATIONS = 1 << 20  # a condition register that never reaches 0 is a kernel bug


# ---- unrolled loops -------------------------------------------------------------------------


def _static(v, what: str) -> int:
    if isinstance(v, (Tensor, VirtualRegister)):
        raise NKIError(f"{what} of a static loop must be a compile-time integer, got a runtime value; "
                       "use nl.fori_loop for a runtime bound")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise NKIError(f"{what} of a loop must be an integer, got {v!r}")
    return int(v)


def _range(start, stop, step) -> range:
    if stop is None:
        start, stop = 0, start
    return range(_static(start, "start"), _static(stop, "stop"), _static(step, "step"))


def static_range(start, stop=None, step=1):
    """Python's ``range``: unrolled while tracing, iterations in order."""
    return _range(start, stop, step)


def sequential_range(start, stop=None, step=1):
    """Deprecated alias of :func:`static_range` (NKI 0.6): iterations in order."""
    return _range(start, stop, step)


def affine_range(start, stop=None, step=1):
    """Deprecated alias of :func:`static_range` (NKI 0.6): iterations in order. Under
    ``lint_parallel_loops=True`` it is checked as the parallel loop older NKI defined (rule 10)."""
    r = _range(start, stop, step)
    ctx = current_or_none()
    if ctx is not None and ctx.lint_parallel_loops:
        return ctx.parallel_loop(r)
    return r


# ---- runtime loops --------------------------------------------------------------------------


def _register(r, what: str) -> VirtualRegister:
    if not isinstance(r, VirtualRegister):
        raise NKIError(f"{what} must be a register (nisa.register_alloc()), got {type(r).__name__}")
    return r


def _runtime(v, what: str) -> int:
    if isinstance(v, VirtualRegister):
        return v.read()
    if isinstance(v, Tensor):
        raise NKIError(f"{what} must be an integer or a register; load a tile's value with nisa.register_load")
    return _static(v, what)


def _step(step, what: str) -> int:
    step = _static(step, f"{what} step")
    if step < 1:
        raise NKIError(f"{what}: step must be a positive compile-time integer, got {step}")
    return step


def fori_loop(lower, upper, body_fun, step=1) -> None:
    """``for i in range(lower, upper, step): body_fun(i)`` on the device; the bounds are integers
    or registers (read when the loop starts), ``i`` a register passed by value."""
    ctx = current()
    ctx.count("sync", "fori_loop")
    if not callable(body_fun):
        raise NKIError("fori_loop: body_fun must be a function of the induction register")
    lo, hi, st = _runtime(lower, "fori_loop lower"), _runtime(upper, "fori_loop upper"), _step(step, "fori_loop")
    for v in range(lo, hi, st):
        body_fun(VirtualRegister(v, "i"))


def while_loop(init, body_fun) -> None:
    """``r = init; while r != 0: r = body_fun(r)`` on the device: the body gets the condition
    register by value and returns the next condition register."""
    ctx = current()
    ctx.count("sync", "while_loop")
    if not callable(body_fun):
        raise NKIError("while_loop: body_fun must be a function of the condition register")
    r = _register(init, "while_loop init")
    for _ in range(MAX_WHILE_ITERATIONS):
        if r.read() == 0:
            return
        r = body_fun(VirtualRegister(r.read(), r.name))
        if not isinstance(r, VirtualRegister):
            raise NKIError(f"while_loop: body_fun must return the next condition register, got {type(r).__name__}")
    raise NKIError(f"while_loop ran {MAX_WHILE_ITERATIONS} iterations: its condition register never became 0")


def dynamic_range(start, stop=None, step=1):
    """Deprecated in NKI 0.6 (use :func:`fori_loop`): iterate a runtime range, yielding registers."""
    warnings.warn("nl.dynamic_range is deprecated since NKI 0.6; use nl.fori_loop", DeprecationWarning, stacklevel=2)
    ctx = current()
    ctx.count("sync", "dynamic_range")
    if stop is None:
        start, stop = 0, start
    lo, hi, st = _runtime(start, "dynamic_range start"), _runtime(stop, "dynamic_range stop"), _step(step, "dynamic_range")
    return (VirtualRegister(v, "i") for v in range(lo, hi, st))
