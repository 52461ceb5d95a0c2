"""Runs the triton backend's test files in child processes, each in the Triton mode it needs.

Triton fixes interpreter-or-compiler mode at its first import (from TRITON_INTERPRET), so the
interpreter tests cannot share a process with tests that must see compiled mode, and neither can
share this process. Two children: ONE pytest process over every interpreter-mode file (with
TRITON_INTERPRET=1; one start-up of torch, triton and transformers instead of one per file) and
one over the compiled-mode file (without the variable). Each child writes a JUnit XML report;
the parent has one test per file that fails with that file's failing tests and their messages,
and that also fails when a file had no passing test, any skipped or xfailed test, or when the
child itself failed outside any test (a collection error, a crash).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
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


def run_child(files: list[str], interpret: bool, report: Path) -> dict:
    """One pytest process over ``files`` (names in tests/triton_modes/); returns its exit code,
    output and, per file, the list of (test name, outcome, message) from its JUnit report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsx", f"--junitxml={report}",
           *(str(HERE / "triton_modes" / f) for f in files)]
    run = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1500)
    per_file = {f: [] for f in files}
    unattributed = []  # testcases no file claims (e.g. a collection error reported under another name)
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            # classname is the dotted module path, e.g. "tests.triton_modes.interp_kernels"; a
            # collection error has an empty classname and the module path as its name
            where = case.get("classname") or case.get("name", "")
            owner = next((f for f in files if f[:-3] in where.split(".")), None)
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = tag
                    message = (el.get("message") or "") + "\n" + (el.text or "")
                    if tag == "skipped" and "xfail" in (el.get("type") or "") + message:
                        outcome = "xfailed"
                    break
            entry = (case.get("name", ""), outcome, message.strip())
            (per_file[owner] if owner else unattributed).append(entry)
    any_bad = any(o != "passed" for cases in per_file.values() for _, o, _ in cases)
    return dict(returncode=run.returncode, tail=(run.stdout + run.stderr)[-6000:], per_file=per_file,
                unattributed=unattributed, report_written=report.exists(), any_bad=any_bad)


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Both children, run once for all of this module's tests (the interpreter one is the slow one)."""
    root = tmp_path_factory.mktemp("triton_modes")
    interp = sorted(f for f, i in CHILDREN.items() if i)
    compiled = sorted(f for f, i in CHILDREN.items() if not i)
    runs = {"interp": run_child(interp, True, root / "interp.xml"),
            "compiled": run_child(compiled, False, root / "compiled.xml")}
    return {f: runs["interp" if CHILDREN[f] else "compiled"] for f in CHILDREN}


@pytest.mark.parametrize("name", sorted(CHILDREN))
def test_triton_child(children, name):
    run = children[name]
    mode = "TRITON_INTERPRET=1" if CHILDREN[name] else "compiled mode"
    assert run["report_written"], f"the {mode} child wrote no report (exit {run['returncode']}):\n{run['tail']}"
    cases = run["per_file"][name]
    bad = [c for c in cases if c[1] != "passed"]
    assert not bad, f"{name} ({mode}): " + "\n\n".join(f"{n}: {o.upper()}\n{m[-2500:]}" for n, o, m in bad)
    assert any(o == "passed" for _, o, _ in cases), f"{name} ({mode}): no test passed\n{run['tail']}"
    # nothing outside the files' own tests went wrong either (a collection error, a crash at exit);
    # where another file of the same child failed, that file's own test reports it
    assert not run["unattributed"], f"{mode} child: {run['unattributed']}\n{run['tail']}"
    if not run["any_bad"]:
        assert run["returncode"] == 0, f"{mode} child exited {run['returncode']}:\n{run['tail']}"
        summary = run["tail"].strip().splitlines()[-1]
        assert " passed" in summary and "skipped" not in summary and "xfail" not in summary, run["tail"]
