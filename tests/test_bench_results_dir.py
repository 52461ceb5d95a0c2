"""Benchmarks write to --out / --out-dir, else $VERISPEC_RESULTS, else ./bench-results of the
current directory; never into the installed package (its bench/results/ holds only the committed
results, written on purpose with VERISPEC_RESULTS=bench/results)."""

import argparse
import json
from pathlib import Path

import pytest

import verispec.bench
from verispec.bench.common import results_dir
from verispec.cli import build_parser, main

PACKAGE = Path(verispec.bench.__file__).resolve().parent
SIM_ARGS = ["bench", "policy", "--seeds", "1", "--new-tokens", "24"]  # the simulator: no model, ~1 s


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("VERISPEC_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _package_state() -> dict:
    """The package's results folder (name -> mtime), and whether a bench-results folder sits in it."""
    results = PACKAGE / "results"
    return {"results": {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.is_dir() else {},
            "bench-results": (PACKAGE / "bench-results").exists()}


def test_results_dir_order(cwd, monkeypatch):
    assert results_dir() == cwd / "bench-results" and (cwd / "bench-results").is_dir()
    monkeypatch.setenv("VERISPEC_RESULTS", str(cwd / "env"))
    assert results_dir() == cwd / "env"
    assert results_dir(str(cwd / "given")) == cwd / "given"  # --out beats the environment


def test_a_run_without_out_writes_under_the_current_directory(cwd):
    before = _package_state()
    assert main(SIM_ARGS) == 0
    data = json.loads((cwd / "bench-results" / "policy_sim.json").read_text())
    assert data["machine"]["cpu_count"]
    assert _package_state() == before


def test_a_run_honours_verispec_results(cwd, monkeypatch):
    monkeypatch.setenv("VERISPEC_RESULTS", str(cwd / "mine"))
    before = _package_state()
    assert main([*SIM_ARGS, "--name", "sim"]) == 0
    assert (cwd / "mine" / "sim.json").is_file()
    assert not (cwd / "bench-results").exists()
    assert _package_state() == before


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_benchmark_help_names_the_default_results_dir():
    benches = _subparsers(_subparsers(build_parser())["bench"])
    outs = {}
    for name, p in benches.items():
        for action in p._actions:
            if {"--out", "--out-dir"} & set(action.option_strings) and "dir" in (action.help or "").lower():
                outs[name] = action.help
    assert {"decode", "e2e", "policy", "traces", "tp", "kernels"} <= set(outs)
    for name, text in outs.items():
        assert "./bench-results" in text and "VERISPEC_RESULTS" in text and "bench/results" not in text, (name, text)
