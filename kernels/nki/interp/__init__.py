"""verispec's NKI interpreter: a NumPy executor of the NKI 0.6 subset in docs/nki.md.

It stands in for AWS's ``nki`` package where that cannot be installed. Use it like the real one::

    from verispec.kernels.nki.interp import nki
    nl, nisa = nki.language, nki.isa

    @nki.jit
    def kernel(x): ...

    out = nki.simulate(kernel)(x_numpy)           # or nki.simulate(kernel, target="trn3")

It follows NKI 0.6 (Neuron SDK 2.32): loops run in order (``static_range`` and its deprecated
aliases are Python's ``range``; ``fori_loop``/``while_loop`` take runtime bounds), a tile holds
on-chip memory while the kernel references it, and fresh memory reads as NaN/sentinel values,
with a check that reports them when they reach a kernel output. It enforces the twelve rules of
docs/nki.md (each violation raises :class:`NKIRuleError` naming its rule; rule 10 is an opt-in
lint stricter than NKI) and counts instructions per engine and DMA bytes per call
(:func:`last_stats`). It checks semantics and tile rules, not speed: its wall-clock time says
nothing about Trainium.
"""

from __future__ import annotations

import types

from . import isa, language
from .context import DEFAULT_TARGET, TARGETS, RunStats, Target
from .errors import RULES, NKIError, NKIRuleError
from .runtime import Kernel, Options, Simulation, UndefinedOutputWarning, jit, last_stats, set_defaults, simulate

# A module object shaped like the real package: nki.jit, nki.simulate, nki.language, nki.isa.
nki = types.ModuleType("nki", "verispec's NKI interpreter, standing in for AWS's nki package")
nki.jit = jit
nki.simulate = simulate
nki.language = language
nki.isa = isa

__all__ = [
    "DEFAULT_TARGET", "Kernel", "NKIError", "NKIRuleError", "Options", "RULES", "RunStats", "Simulation", "TARGETS",
    "Target", "UndefinedOutputWarning", "isa", "jit", "language", "last_stats", "nki", "set_defaults", "simulate",
]
