"""``verispec bench speculative`` runs end to end on a tiny model and writes its JSON and plot."""

import json

from verispec.cli import main


def test_bench_speculative_smoke(tiny_hf, tmp_path):
    target, _ = tiny_hf()
    out = tmp_path / "results"
    code = main(["bench", "speculative", "--target", target, "--draft", "self:1", "--ks", "2,3",
                 "--temperatures", "0,0.7", "--max-new-tokens", "6", "--amp", "f32", "--random-prompts",
                 "--prompts", "2", "--bandwidth-bytes", "8000000", "--out-dir", str(out)])
    assert code == 0
    data = json.loads((out / "speculative.json").read_text())
    assert (out / "speculative.png").stat().st_size > 0
    runs = [r for r in data["results"] if "k" in r]
    assert [(r["temperature"], r["k"]) for r in runs] == [(0.0, 2), (0.0, 3), (0.7, 2), (0.7, 3)]
    for r in runs:
        assert 0 <= r["acceptance_rate"] <= 1 and r["tokens_per_s"] > 0 and r["speedup_predicted"] > 0
    # fp32 greedy: the speculative output is the target's own greedy output
    assert all(r["greedy_divergence"]["diverged_prompts"] == 0 for r in runs if r["temperature"] == 0)
    assert data["memory_bandwidth"]["read_GBps"] > 0 and data["weight_bytes"] > 0
