"""Where the NKI kernel tests run: verispec's interpreter here, AWS's ``nki.simulate`` on a
machine where the real ``nki`` imports (the kernel files bind to whichever ``_nki`` found)."""

from __future__ import annotations

import pytest

from verispec.kernels.nki._nki import REAL_NKI

LANES = [
    pytest.param("interpreter", marks=pytest.mark.skipif(
        REAL_NKI, reason="the kernels are bound to AWS's nki in this process; set VERISPEC_NKI=interp for the interpreter")),
    pytest.param("nki.simulate", marks=[pytest.mark.neuron, pytest.mark.skipif(
        not REAL_NKI, reason="needs AWS's nki package (nki.simulate); it is not importable here")]),
]
interp_only = pytest.mark.skipif(REAL_NKI, reason="checks verispec's interpreter, and the kernels are bound to AWS's nki here")
