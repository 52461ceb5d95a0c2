"""verispec's NKI interpreter: a NumPy executor of the NKI 0.3 subset in docs/nki.md.

It stands in for AWS's ``nki`` package where that cannot be installed. Use it like the real one::

    from verispec.kernels.nki.interp import nki
    nl, nisa = nki.language, nki.isa

    @nki.jit
    def kernel(x): ...

    out = nki.simulate(kernel)(x_numpy)           # or nki.simulate(kernel, target="trn2")

It enforces the twelve rules of docs/nki.md (each violation raises :class:`NKIRuleError`
naming its rule) and counts instructions per engine and DMA bytes per call
(:func:`last_stats`). It checks semantics and tile rules, not speed: its wall-clock time says
nothing about Trainium.
"""

from __future__ import annotations

import types

from . import isa, language
from .context import TARGETS, RunStats
from .errors import RULES, NKIError, NKIRuleError
from .runtime import Kernel, Options, Simulation, jit, last_stats, set_defaults, simulate

# A module object shaped like the real package: nki.jit, nki.simulate, nki.language, nki.isa.
nki = types.ModuleType("nki", "verispec's NKI interpreter, standing in for AWS's nki package")
nki.jit = jit
nki.simulate = simulate
nki.language = language
nki.isa = isa

__all__ = [
    "Kernel", "NKIError", "NKIRuleError", "Options", "RULES", "RunStats", "Simulation", "TARGETS", "isa", "jit",
    "language", "last_stats", "nki", "set_defaults", "simulate",
]
