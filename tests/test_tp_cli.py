"""``verispec generate --tp-degree 2`` (speculative, draft replicated per rank) starts itself under torchrun
and prints what tp_degree=1 prints."""

import os
import re
import subprocess
import sys

import pytest

from conftest import build_tiny_hf, word_tokenizer
from verispec.cli import main

pytestmark = pytest.mark.dist


def _texts(stdout: str) -> list[str]:
    """The generated lines of stdout (the continuation alone: the prompt is not echoed)."""
    return [line for line in stdout.splitlines() if re.fullmatch(r"t\d+( t\d+)*", line.strip())]


def _argv(path, tp_degree: int) -> list[str]:
    return ["generate", " t5 t17 t33 t2", "--target", path, "--amp", "f32", "--max-new-tokens", "12",
            "--n-positions", "64", "--tp-degree", str(tp_degree), "--draft", path, "-k", "3"]


def test_generate_tp2_relaunches_under_torchrun_and_matches_tp1(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    path, _ = build_tiny_hf(tmp_path / "tiny", "llama")
    word_tokenizer(tmp_path / "tiny", 97)
    assert main(_argv(path, 1)) == 0  # in this process
    texts = _texts(capsys.readouterr().out)
    assert len(texts) == 1 and len(texts[0].split()) == 12, texts

    cmd = [sys.executable, "-m", "verispec", *_argv(path, 2)]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-3000:]  # without the relaunch, tp_degree=2 in one process fails
    # one copy of the text (rank 0 prints, rank 1 is quiet), identical to tp_degree=1's
    assert _texts(two.stdout) == texts, two.stdout
    assert two.stderr.count("new tokens") == 1 and "acceptance rate" in two.stderr  # rank 0's table only


def test_generate_rejects_a_non_dividing_tp_degree_before_starting_ranks(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    path, _ = build_tiny_hf(tmp_path / "tiny", "llama")
    assert main(_argv(path, 3)) == 1
    assert "tp_degree=3 does not divide num_attention_heads=4" in capsys.readouterr().err
