"""``verispec bench tp`` runs end to end on a tiny checkpoint and writes its JSON and plot."""

import json

import pytest

from conftest import build_tiny_hf
from verispec.cli import main


@pytest.mark.dist
def test_bench_tp_smoke(tmp_path):
    path, _ = build_tiny_hf(tmp_path / "tiny", "llama")
    draft, _ = build_tiny_hf(tmp_path / "draft", "llama", seed=1, num_hidden_layers=1)
    out = tmp_path / "results"
    rc = main(["bench", "tp", "--target", path, "--draft", draft, "--tp", "1", "2", "--amp", "f32",
               "--prompt-len", "5", "--new-tokens", "6", "--bandwidth-mib", "8", "--threads-per-rank", "1", "--out-dir", str(out)])
    assert rc == 0
    data = json.loads((out / "tp.json").read_text())
    assert (out / "tp.png").stat().st_size > 0
    runs = {r["tp_degree"]: r for r in data["runs"]}
    assert sorted(runs) == [1, 2] and len(runs[2]["per_rank"]) == 2
    assert runs[2]["target_tokens_identical_to_first"]  # fp32 greedy: tp=2 decodes what tp=1 does
    full, halves = runs[1]["per_rank"][0]["target_param_bytes"], [r["target_param_bytes"] for r in runs[2]["per_rank"]]
    assert max(halves) < 0.6 * full  # each rank holds about half the weights
    for r in runs[2]["per_rank"]:
        assert r["peak_rss_bytes"] >= r["rss_after_target_bytes"] > 0
    assert runs[2]["target_only"]["tokens_per_s"] > 0
    for r in runs.values():  # greedy fp32: speculative decodes the target-only tokens, at every tp_degree
        assert r["speculative"]["ran"] and r["speculative"]["draft_tp_degree"] == 1
        assert r["speculative_tokens_identical_to_target_only"]
        assert r["speculative"]["stats"]["proposed_drafts"] > 0
