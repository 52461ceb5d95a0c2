"""``verispec bench policy`` runs the simulator for every scenario and variant, writes its JSON and
prints its table; its ratios are recomputed here from the rates it stores."""

import json
import statistics

from verispec.cli import main


def test_bench_policy_json_and_table(tmp_path, capsys):
    assert main(["bench", "policy", "--seeds", "2", "--new-tokens", "24", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "policy_sim.json").read_text())
    assert data["seeds"] == 2 and data["costs"]["draft_s"] == 0.03
    cells = [(c["scenario"], c["cell"]) for c in data["cells"]]
    assert ("e2e cells", "prose/0.7") in cells and ("code, chat, code", "chat") in cells and len(cells) == 8
    for c in data["cells"]:
        rates = {int(k): v for k, v in c["fixed_tokens_per_s"].items()}
        assert sorted(rates) == list(range(1, 9)) and c["best_fixed_k"] == max(rates, key=rates.get)
        assert c["median_fixed_2_8"] == statistics.median(rates[k] for k in range(2, 9))
        assert set(c["policies"]) == {"auto", "auto carry_cap=inf", "auto carry=0", "auto explore_from_1=8"}
        per_seed = {int(k): v for k, v in c["fixed_tokens_per_s_per_seed"].items()}
        for p in c["policies"].values():
            assert p["over_best"] == p["tokens_per_s"] / rates[c["best_fixed_k"]]
            assert p["tokens_per_s"] == statistics.mean(p["tokens_per_s_per_seed"])
            within = [a >= 0.97 * max(per_seed[k][s] for k in range(2, 9)) for s, a in enumerate(p["tokens_per_s_per_seed"])]
            assert p["single_run_within_3pct"] == sum(within) / 2
            assert 0 <= p["k1_share"] <= 1
    out = capsys.readouterr().out
    assert "best fixed k" in out and "code again" in out and "carry_cap=inf" in out and "policy_sim.json" in out


def test_bench_policy_bad_options(tmp_path, capsys):
    assert main(["bench", "policy", "--seeds", "0", "--out-dir", str(tmp_path)]) == 1
    assert "--seeds" in capsys.readouterr().err
    assert main(["bench", "policy", "--seeds", "1", "--draft-ms", "-1", "--out-dir", str(tmp_path)]) == 1
    assert "costs must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "policy_sim.json").exists()
