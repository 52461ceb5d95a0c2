"""``verispec bench policy`` runs the simulator for every scenario and variant, writes its JSON and
prints its table; its ratios are recomputed here from the rates it stores."""

import json
import statistics

import pytest

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
        assert set(c["policies"]) == {"auto", "auto gate=off", "auto carry_cap=inf", "auto carry=0", "auto explore_from_1=8",
                                   "auto level=off", "auto explore=off"}
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
    for bad, err in [("1,2,3", "needs 8 values"), ("1,2,x,4,5,6,7,8", "comma-separated numbers"),
                     ("1,2,3,4,5,6,7,0", "verify_by_k must hold seconds > 0")]:
        assert main(["bench", "policy", "--seeds", "1", "--verify-ms-by-k", bad, "--out-dir", str(tmp_path)]) == 1
        assert err in capsys.readouterr().err
    assert main(["bench", "policy", "--seeds", "1", "--calibration-ms-by-k", "1,2", "--out-dir", str(tmp_path)]) == 1
    assert "--calibration-ms-by-k needs 8 values" in capsys.readouterr().err
    assert main(["bench", "policy", "--seeds", "1", "--drift-s", "0", "--out-dir", str(tmp_path)]) == 1
    assert "drift_s > 0" in capsys.readouterr().err
    assert not (tmp_path / "policy_sim.json").exists()


def test_bench_policy_with_a_measured_curve_and_drift(tmp_path):
    """The curve and drift go into the costs the JSON records; k = 1's fixed rate is a pure verify
    rate at 82 ms (no noise, no drift) and moves once drift is on."""
    argv = ["bench", "policy", "--seeds", "1", "--new-tokens", "16", "--noise", "0", "--overhead-ms", "0",
            "--verify-ms-by-k", "82,92,95,97,95,97,108,117", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "policy_sim.json").read_text())
    assert data["costs"]["verify_by_k"] == [x / 1e3 for x in (82, 92, 95, 97, 95, 97, 108, 117)]
    assert data["costs"]["verify_s"] == 0.082 and data["costs"]["drift"] == 0.0
    rate_k1 = data["cells"][0]["fixed_tokens_per_s"]["1"]
    assert rate_k1 == pytest.approx(1 / 0.082)
    assert main(argv + ["--calibration-ms-by-k", "130,97,89,121,115,113,136,154"]) == 0
    data = json.loads((tmp_path / "policy_sim.json").read_text())
    assert data["costs"]["calibration_by_k"] == [x / 1e3 for x in (130, 97, 89, 121, 115, 113, 136, 154)]
    assert data["cells"][0]["fixed_tokens_per_s"]["1"] == pytest.approx(1 / 0.082)  # fixed k's never calibrate
    assert main(argv + ["--drift", "0.3", "--drift-s", "5"]) == 0
    data = json.loads((tmp_path / "policy_sim.json").read_text())
    assert data["costs"]["drift"] == 0.3 and data["costs"]["drift_s"] == 5.0
    assert data["cells"][0]["fixed_tokens_per_s"]["1"] != pytest.approx(1 / 0.082, rel=0.01)


def _replay_fixed_k(traces, k, n, draft_s, verify_s, slope):
    """Independent greedy replay at fixed k with no catch-up, overhead or noise: tokens / seconds."""
    tokens = seconds = 0.0
    for t in traces:
        done, tokens = 1, tokens + 1  # the prefill makes the first token
        while done < n:
            g = min(k - 1, n - done - 1)
            a = 0
            while a < g and t[done + a]:
                a += 1
            seconds += g * draft_s + verify_s * (1 + slope * g)
            tokens += a + 1
            done += a + 1
    return tokens / seconds


def test_bench_traces_then_policy_replays_them(tmp_path, capsys):
    """`bench traces` records a tiny pair's greedy agreement (the int8 copy of the target as draft);
    `bench policy --traces` adds one replay cell per prompt set, whose fixed-k rates are recomputed
    here by an independent replay."""
    from conftest import build_tiny_hf

    target, _ = build_tiny_hf(tmp_path / "t", "llama", seed=3)
    assert main(["bench", "traces", "--target", str(target), "--draft", str(target), "--draft-quant", "int8",
                 "--amp", "f32", "--random-prompts", "--prompts", "3", "--max-new-tokens", "20",
                 "--out-dir", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "traces.json").read_text())
    assert set(rec["traces"]) == {"code", "prose"}
    for name, ts in rec["traces"].items():
        assert len(ts) == 3 and all(len(t) == 20 and set(t) <= {0, 1} for t in ts)
        assert rec["agreement"][name] == sum(map(sum, ts)) / 60
        confs = rec["confidence"][name]  # the draft's probability of its greedy choice, per token
        assert [len(c) for c in confs] == [20] * 3 and all(0 < x <= 1 for c in confs for x in c)
    assert "greedy agreement" in capsys.readouterr().out
    assert main(["bench", "policy", "--seeds", "1", "--new-tokens", "20", "--noise", "0", "--catch-up", "0",
                 "--overhead-ms", "0", "--traces", str(tmp_path / "traces.json"), "--out-dir", str(tmp_path)]) == 0
    cells = {(c["scenario"], c["cell"]): c for c in json.loads((tmp_path / "policy_sim.json").read_text())["cells"]}
    for name in ("code", "prose"):
        c = cells[("traces traces.json", f"{name}/0")]
        for k in (1, 3, 6):
            expected = _replay_fixed_k(rec["traces"][name], k, 20, 0.030, 0.072, 0.1)
            assert abs(c["fixed_tokens_per_s"][str(k)] - expected) < 1e-9 * expected
        assert set(c["policies"]) >= {"auto", "auto gate=off"}
    assert main(["bench", "policy", "--seeds", "1", "--traces", str(tmp_path / "nope.json"),
                 "--out-dir", str(tmp_path)]) == 1
    assert "nope.json: no such file" in capsys.readouterr().err


def test_bench_traces_bad_options(tmp_path, capsys):
    from conftest import build_tiny_hf

    target, _ = build_tiny_hf(tmp_path / "t", "llama")
    base = ["bench", "traces", "--target", str(target), "--draft", str(target), "--amp", "f32", "--random-prompts",
            "--out-dir", str(tmp_path)]
    assert main([*base, "--prompt-sets", "poems"]) == 1
    assert "unknown prompt set 'poems' in --prompt-sets" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"traces": {"code": [[1, 0, 2]]}}')
    assert main(["bench", "policy", "--seeds", "1", "--new-tokens", "3", "--traces", str(bad),
                 "--out-dir", str(tmp_path)]) == 1
    assert "each 0 or 1" in capsys.readouterr().err
    assert not (tmp_path / "traces.json").exists()
