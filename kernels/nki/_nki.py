"""The one place NKI kernel files import NKI from.

AWS's ``nki`` package (compiler, simulator, hardware) when it is importable, else verispec's
NumPy interpreter of the same dialect, so a kernel file runs unchanged on a Neuron machine.
``VERISPEC_NKI=interp`` forces the interpreter even where the real package exists.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("verispec.kernels.nki")


def _real_nki():
    if os.environ.get("VERISPEC_NKI", "").lower() == "interp":
        return None
    try:
        import nki as real  # AWS's package; only on machines with the Neuron package index
        import nki.isa  # noqa: F401
        import nki.language  # noqa: F401
    except ImportError:
        return None
    if not all(hasattr(real, a) for a in ("jit", "simulate", "language", "isa")):
        log.warning("an `nki` package is installed but is not AWS's NKI (no jit/simulate); using the interpreter")
        return None
    return real


_real = _real_nki()
REAL_NKI = _real is not None
if REAL_NKI:
    nki = _real
else:
    from .interp import nki
nl = nki.language
nisa = nki.isa

__all__ = ["REAL_NKI", "nisa", "nki", "nl"]
