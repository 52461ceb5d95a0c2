"""The CUDA roofline benchmark's logic at tiny sizes on CPU (Triton's interpreter): the SDPA
baseline does the same work as the kernel, byte counts and ratios are what they claim, the JSON
and the plot are written; and the command refuses to run without a GPU.

Run by tests/test_triton_modes.py in a child process started with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json

import pytest
import torch

from verispec.bench import kernels_cuda as kc
from verispec.bench.common import write_json
from verispec.cli import main
from verispec.kernels.triton import interpreting

TINY_SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attention_bias=True, model_type="qwen2", max_position_embeddings=256)


@pytest.fixture(autouse=True)
def _check_interpreter_mode():
    assert interpreting(), "run this file with TRITON_INTERPRET=1 set before triton is imported"


def test_min_bytes_counts_kv_q_out_and_positions():
    # K and V: 2 x (1 x 2 x 100 x 16) bf16 = 12800 B; q + out: 2 x (1 x 4 x 3 x 16) x 2 = 768 B; positions 8 B
    assert kc.min_bytes(B=1, H=4, H_kv=2, T=3, D=16, L=100, elem=2) == 12800 + 768 + 8


def test_attention_rows_on_the_interpreter(tmp_path):
    timer = kc.make_timer("cpu")
    rows = kc.attention_rows([1, 5], [64, 300], B=1, H=4, H_kv=2, D=16, dtype=torch.float32, device="cpu",
                             copy_GBps=10.0, timer=timer)
    assert [(r["T"], r["L"]) for r in rows] == [(1, 64), (5, 64), (1, 300), (5, 300)]
    for r in rows:
        # SDPA (both GQA variants) computes the same attention as the kernel
        assert r["sdpa_gqa_max_abs_diff"] < 1e-5 and r["sdpa_expanded_kv_max_abs_diff"] < 1e-5, r
        assert r["triton_s"] > 0 and r["sdpa_best_s"] == min(r["sdpa_gqa_s"], r["sdpa_expanded_kv_s"])
        assert r["sdpa_over_triton"] == pytest.approx(r["sdpa_best_s"] / r["triton_s"])
        assert r["triton_GBps"] == pytest.approx(r["min_bytes"] / r["triton_s"] / 1e9)
        assert r["fraction_of_copy_bw"] == pytest.approx(r["triton_GBps"] / 10.0)
    ratios = kc.verify_over_decode(rows, k=5)
    assert [x["L"] for x in ratios] == [64, 300]
    assert ratios[0]["ratio"] == pytest.approx(rows[1]["triton_s"] / rows[0]["triton_s"])

    model_rows = kc.model_step_rows([40], k=5, dtype=torch.float32, device="cpu", backends=("triton", "torch"),
                                    shape=TINY_SHAPE, timer_repeats=1)
    assert [r["backend"] for r in model_rows] == ["triton", "torch"]
    assert all(r["ratio"] == pytest.approx(r["verify_s"] / r["decode_s"]) for r in model_rows)

    summary = kc.goals(rows, ratios, model_rows)
    assert summary["min_sdpa_over_triton"] == min(r["sdpa_over_triton"] for r in rows)
    assert summary["min_fraction_of_copy_bw_at_L>=4096"] is None  # no such length in this run
    assert summary["met"]["copy_bw_70pct_at_L>=4096"] is False

    path = write_json("kernels_cuda", dict(attention=rows, goals=summary), str(tmp_path))
    assert json.loads(path.read_text())["attention"][0]["T"] == 1
    kc.plot(rows, 10.0, tmp_path / "kernels_cuda.png")
    assert (tmp_path / "kernels_cuda.png").stat().st_size > 1000


def test_command_refuses_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "kernels-cuda"]) == 1  # the CLI prints the error and exits 1
    assert "CUDA" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="measures a CUDA GPU and none is visible"):
        main(["-v", "bench", "kernels-cuda"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="comma-separated list of integers"):
        kc._ints("1,x")
    with pytest.raises(ValueError, match="positive integers"):
        kc._ints("0,4")
