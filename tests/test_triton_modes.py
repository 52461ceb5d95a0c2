"""Runs the triton backend's test files in child processes, each in the Triton mode it needs.

Triton fixes interpreter-or-compiler mode at its first import (from TRITON_INTERPRET), so the
interpreter tests cannot share a process with tests that must see compiled mode; a child
process per file keeps the variable out of every other test's process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs the triton package (a test dependency)")

HERE = Path(__file__).resolve().parent
CHILDREN = {
    "interp_kernels.py": True,  # verify_attention + kv_append conformance on the interpreter
    "interp_accept_reject.py": True,  # accept/reject kernel == rejection_sample (Hypothesis)
    "interp_bench.py": True,  # the CUDA roofline benchmark's logic at tiny sizes
    "compiled_mode.py": False,  # refusal of CPU tensors without the interpreter
}


@pytest.mark.parametrize("name", sorted(CHILDREN))
def test_triton_child(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if CHILDREN[name]:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsx", str(HERE / "triton_modes" / name)]
    run = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"{name} failed in its child process:\n{tail}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "xfail" not in summary, tail
