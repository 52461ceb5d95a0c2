"""``verispec bench e2e`` runs end to end on tiny checkpoints, transformers included, and writes
its JSON, plots and table; bad options give clear errors before any model is loaded."""

import json
import statistics

import pytest

from conftest import build_tiny_hf
from verispec.cli import main

TINY_ARGS = ["--max-new-tokens", "6", "--prompts", "2", "--random-prompts", "--amp", "f32", "--bandwidth-bytes", "8000000"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    target, _ = build_tiny_hf(root / "target", "llama")
    draft, _ = build_tiny_hf(root / "draft", "llama", seed=1, num_hidden_layers=1)
    return target, draft, root


def _key(p):
    return p["engine"], p["mode"], p["k"]


def test_bench_e2e_every_path_json_plots_and_table(tiny_pair, tmp_path, capsys):
    target, draft, root = tiny_pair
    out = tmp_path / "results"
    rc = main(["bench", "e2e", "--target", target, "--draft", draft, "--ks", "2,3", "--auto", "--temperatures", "0,0.7",
               "--prompt-sets", "code,prose", "--hf", "--hf-dir", str(root / "hf"), "--out-dir", str(out), *TINY_ARGS])
    assert rc == 0
    data = json.loads((out / "e2e.json").read_text())
    for png in ("e2e_tokens_per_s.png", "e2e_speedup.png", "e2e_acceptance.png", "e2e_flat64.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench e2e" in data["command"] and "--ks 2,3" in data["command"]
    assert data["memory_bandwidth"]["read_GBps"] > 0 and data["machine"]["torch_threads"] == data["torch_threads"]
    assert data["hf"]["ran"] and data["hf"]["assisted"]["num_assistant_tokens"] is not None
    assert [(r["prompt_set"], r["temperature"]) for r in data["runs"]] == [
        ("code", 0.0), ("code", 0.7), ("prose", 0.0), ("prose", 0.7)]
    expected = [("verispec", "target-only", None), ("verispec", "speculative", 2), ("verispec", "speculative", 3),
                ("verispec", "speculative", "auto"), ("transformers", "target-only", None), ("transformers", "assisted", None)]
    for run in data["runs"]:
        paths = {_key(p): p for p in run["paths"]}
        assert list(paths) == expected
        for p in run["paths"]:  # EOS never stops: every path makes 6 new tokens per prompt
            assert [r["new_tokens"] for r in p["per_prompt"]] == [6, 6] and p["new_tokens"] == 12
            assert p["e2e_tokens_per_s"] == pytest.approx(12 / p["wall_s"])
        base = paths[("verispec", "target-only", None)]
        hf_assisted = paths[("transformers", "assisted", None)]
        for k in (2, 3, "auto"):
            spec = paths[("verispec", "speculative", k)]
            assert len(spec["position_acceptance"]) == max(int(j) for j in spec["k_counts"]) - 1
            assert 0 <= spec["acceptance_rate"] <= 1
            assert spec["speedup_vs_target_only"] == pytest.approx(spec["tokens_per_s"] / base["tokens_per_s"])
            assert spec["e2e_speedup_vs_hf_assisted"] == pytest.approx(
                spec["e2e_tokens_per_s"] / hf_assisted["e2e_tokens_per_s"])
            if run["temperature"] == 0:  # fp32 greedy: speculative decodes exactly the target-only tokens
                assert spec["greedy_divergence"]["diverged_prompts"] == 0
        if run["temperature"] == 0:  # same weights, same greedy rule in transformers
            for key in expected[4:]:
                assert paths[key]["greedy_divergence_from_verispec_target_only"]["diverged_prompts"] == 0
        fixed = {k: paths[("verispec", "speculative", k)]["tokens_per_s"] for k in (2, 3)}
        assert run["summary"]["best_fixed_k"] == max(fixed, key=fixed.get)
        assert run["summary"]["median_fixed_tokens_per_s"] == pytest.approx(statistics.median(fixed.values()))
        auto = paths[("verispec", "speculative", "auto")]
        assert auto["calibration_s"] == 0  # calibrated once, in the untimed warm-up
        assert data["auto_calibration_s_in_warmup"] > 0
        state = run["auto_policy_state"]  # k=auto's beliefs after the cell: a monotone verify table, k = 1..8
        table = [state["verify_s"][str(k)] for k in range(1, 9)]
        assert table == sorted(table) and state["draft_s_per_position"] > 0 and state["gated"]
        assert len(state["position_acceptance"]) == 7 and all(0 <= a <= 1 for a in state["confidence_acceptance"])
        assert run["summary"]["auto_over_best"] == pytest.approx(auto["tokens_per_s"] / max(fixed.values()))
        assert run["summary"]["auto_beats_median"] == (auto["tokens_per_s"] > statistics.median(fixed.values()))
        best = paths[("verispec", "speculative", run["summary"]["best_fixed_k"])]
        assert run["summary"]["best_fixed_e2e_speedup_vs_hf_assisted"] == best["e2e_speedup_vs_hf_assisted"]
        assert run["summary"]["auto_speedup_vs_target_only"] == auto["speedup_vs_target_only"]
        for k in (2, 3, "auto"):  # the per-k verify seconds add up to the path's verify seconds and steps
            c = paths[("verispec", "speculative", k)]["pass_costs"]
            assert sum(c["target_s_by_k"].values()) == pytest.approx(c["target_s"])
            assert c["steps"] == sum(paths[("verispec", "speculative", k)]["k_counts"].values())
            assert paths[("verispec", "speculative", k)]["priced_tokens_per_s"] > 0
        priced = {k: paths[("verispec", "speculative", k)]["priced_tokens_per_s"] for k in (2, 3)}
        assert run["summary"]["priced_best_fixed_k"] == max(priced, key=priced.get)
        assert run["summary"]["priced_auto_over_best"] == pytest.approx(
            paths[("verispec", "speculative", "auto")]["priced_tokens_per_s"] / max(priced.values()))
    printed = capsys.readouterr().out
    for text in ("target-only", "k=2", "k=3", "k=auto", "HF target-only", "HF assisted", "prose", "wrote", "x best fixed k=",
                 "x transformers assisted (end to end)", "priced at the cell's pooled pass costs"):
        assert text in printed


def test_bench_e2e_self_draft_skips_hf_assisted_and_reuses_conversion(tiny_pair, tmp_path, capsys):
    target, _, _ = tiny_pair
    args = ["bench", "e2e", "--target", target, "--draft", "self:1", "--ks", "2", "--no-auto", "--temperatures", "0",
            "--prompt-sets", "code", "--hf-dir", str(tmp_path / "hf"), "--out-dir", str(tmp_path), "--name", "selfdraft",
            *TINY_ARGS]
    assert main(args) == 0
    first = json.loads((tmp_path / "selfdraft.json").read_text())
    assert first["hf"]["target_converted_now"]
    assert main(args) == 0
    data = json.loads((tmp_path / "selfdraft.json").read_text())
    assert not data["hf"]["target_converted_now"]  # the converted directory is cached
    assert "not a model" in data["hf"]["note"]
    (run,) = data["runs"]
    assert [_key(p) for p in run["paths"]] == [("verispec", "target-only", None), ("verispec", "speculative", 2),
                                               ("transformers", "target-only", None)]
    assert run["paths"][1]["greedy_divergence"]["diverged_prompts"] == 0
    assert "assisted generation not run" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("--prompt-sets", "code,poetry", "unknown prompt set 'poetry'"),
    ("--ks", "1,2", "k=1 out of range"),
    ("--ks", "2,2.5", "comma-separated integers"),
    ("--ks", "3,3", "k=3 given twice"),
    ("--ks", "2,1000", "k=1000 out of range"),
    ("--temperatures", "0,-0.5", "temperature -0.5 out of range"),
    ("--temperatures", "nan", "temperature nan out of range"),
    ("--temperatures", "warm", "comma-separated numbers"),
    ("--prompts", "0", "--prompts must be >= 1"),
    ("--repeats", "0", "--repeats must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
    ("--max-new-tokens", "400", "exceeds the target's max_position_embeddings=256"),
    ("--trees", "2,x", "--trees: bad tree '2,x'"),
    ("--trees", "dynamic:0", "--trees: bad tree 'dynamic:0'"),
    ("--trees", "2,1;dynamic:4;2,1", "tree '2,1' given twice"),
    ("--tree-acceptors", "multistep,bogus", "--tree-acceptors: unknown 'bogus'"),
    ("--tree-children", "sample,random", "--tree-children: unknown 'random'"),
    ("--chain-acceptors", "default,typical", "--chain-acceptors: unknown 'typical'"),
    ("--chain-acceptors", "block,block", "--chain-acceptors 'block,block' repeats a name"),
    ("--tree-depth-k", "1", "--tree-depth-k must be >= 2"),
])
def test_bench_e2e_bad_options(tiny_pair, tmp_path, capsys, option, value, message):
    target, draft, _ = tiny_pair
    args = ["bench", "e2e", "--target", target, "--draft", draft, "--no-auto", "--no-hf", "--out-dir", str(tmp_path),
            *TINY_ARGS, option, value]
    assert main(args) == 1
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "e2e.json").exists()


def test_bench_e2e_acceptance_and_speedup_table_without_out_dir(tiny_pair, tmp_path, monkeypatch, capsys):
    """The plain draft/target table (what ``bench speculative`` was): per k and temperature,
    acceptance, tokens per pass, measured and predicted speedup, target-only's weight bandwidth;
    with no --out-dir everything lands in ./bench-results of the current directory."""
    target, _, _ = tiny_pair
    monkeypatch.delenv("VERISPEC_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "e2e", "--target", target, "--draft", "self:1", "--ks", "2,3", "--no-auto", "--no-hf",
                 "--temperatures", "0,0.7", "--prompt-sets", "code", *TINY_ARGS]) == 0
    out = tmp_path / "bench-results"
    assert sorted(f.name for f in out.iterdir()) == ["e2e.json", "e2e_acceptance.png", "e2e_flat64.png",
                                                      "e2e_speedup.png", "e2e_tokens_per_s.png"]
    data = json.loads((out / "e2e.json").read_text())
    assert data["memory_bandwidth"]["read_GBps"] > 0 and data["target_weight_bytes"] > 0
    assert [(r["temperature"], [p["k"] for p in r["paths"]]) for r in data["runs"]] == [(0.0, [None, 2, 3]),
                                                                                      (0.7, [None, 2, 3])]
    for run in data["runs"]:
        base, *spec = run["paths"]
        assert base["achieved_GBps"] == pytest.approx(data["target_weight_bytes"] * base["tokens_per_s"] / 1e9)
        assert base["fraction_of_read_bandwidth"] == pytest.approx(
            base["achieved_GBps"] / data["memory_bandwidth"]["read_GBps"])
        for p in spec:
            assert 0 <= p["acceptance_rate"] <= 1 and 1 <= p["mean_tokens_per_pass"] <= p["k"]
            assert p["tokens_per_s"] > 0 and p["predicted_speedup"] > 0 and p["c"] >= 0
            assert set(p["r_by_k"]) == set(p["k_counts"])
            if run["temperature"] == 0:  # fp32 greedy: the target's own greedy tokens
                assert p["greedy_divergence"]["diverged_prompts"] == 0
    assert "predicted" in capsys.readouterr().out


def test_bench_e2e_int8_draft_is_recorded_and_needs_a_model(tiny_pair, tmp_path, capsys):
    target, draft, _ = tiny_pair
    args = ["bench", "e2e", "--target", target, "--ks", "2", "--no-auto", "--no-hf", "--temperatures", "0",
            "--prompt-sets", "code", "--out-dir", str(tmp_path), "--draft-quant", "int8", *TINY_ARGS]
    assert main([*args, "--draft", draft]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["draft_quant"] == "int8" and "--draft-quant int8" in data["command"]
    (run,) = data["runs"]
    assert run["paths"][1]["greedy_divergence"]["diverged_prompts"] == 0  # fp32 target: same tokens
    capsys.readouterr()
    assert main([*args, "--draft", "ngram", "--name", "ngram8"]) == 1
    assert "--draft-quant int8 needs a draft model" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "ngram8.json").exists()


def test_bench_e2e_real_prompt_set_larger_than_asked(tiny_pair, tmp_path, capsys):
    """Without --random-prompts the set must hold the asked number of prompts: nothing is cut silently."""
    target, draft, _ = tiny_pair
    rc = main(["bench", "e2e", "--target", target, "--draft", draft, "--no-auto", "--no-hf", "--prompts", "50",
               "--out-dir", str(tmp_path)])
    assert rc == 1
    assert "has 8 prompts, 50 asked for" in capsys.readouterr().err.replace("\n", " ")


def test_bench_e2e_repeats_keep_each_repeats_rates(tiny_pair, tmp_path, capsys):
    """--repeats 2 runs every prompt twice; each path keeps its tokens/s per repeat (computed here
    from the per-prompt rows), and k=auto is compared with the best fixed k of the same repeat."""
    target, draft, _ = tiny_pair
    assert main(["bench", "e2e", "--target", target, "--draft", draft, "--ks", "2,3,4", "--auto", "--no-hf",
                 "--temperatures", "0", "--prompt-sets", "code", "--repeats", "2", "--out-dir", str(tmp_path),
                 "--interleave", "prompt", *TINY_ARGS]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["interleave"] == "prompt" and data["method"]["order"].startswith("prompt-major")
    (run,) = data["runs"]
    assert run["prompts"] == 2 and run["repeats"] == 2
    per_repeat = {}
    for p in run["paths"]:
        rows = p["per_prompt"]
        assert len(rows) == 4 and [r["new_tokens"] for r in rows] == [6] * 4
        assert rows[0]["prompt_tokens"] == rows[2]["prompt_tokens"] and rows[1]["prompt_tokens"] == rows[3]["prompt_tokens"]
        expected = [12 / (rows[0]["decode_s"] + rows[1]["decode_s"]), 12 / (rows[2]["decode_s"] + rows[3]["decode_s"])]
        assert p["tokens_per_s_per_repeat"] == pytest.approx(expected)
        per_repeat[p["k"]] = expected
    s = run["summary"]
    ratios = [per_repeat["auto"][r] / max(per_repeat[k][r] for k in (2, 3, 4)) for r in range(2)]
    assert s["auto_over_best_per_repeat"] == pytest.approx(ratios)
    assert s["auto_within_3pct_repeats"] == sum(x >= 0.97 for x in ratios)
    assert s["auto_beats_median_repeats"] == sum(
        per_repeat["auto"][r] > statistics.median(per_repeat[k][r] for k in (2, 3, 4)) for r in range(2))
    assert "per repeat:" in capsys.readouterr().out


def test_priced_tokens_per_s_pools_the_cells_pass_costs():
    """Hand-worked: pooled verify price per pass is 0.2 s at k=2, 0.4 s at k=3, 0.3 s at k=1; draft
    0.2 s per drafted position (4 s / 20); other loop time 0.05 s per pass ((0.5 + 0.3) s / 16)."""
    from verispec.bench.e2e_report import add_priced

    a = {"engine": "verispec", "mode": "speculative", "k": 2, "new_tokens": 20, "decode_s": 3.5, "k_counts": {2: 10},
         "pass_costs": {"steps": 10, "drafted_positions": 10, "draft_s": 1.0, "target_s": 2.0, "target_s_by_k": {2: 2.0}}}
    b = {"engine": "verispec", "mode": "speculative", "k": "auto", "new_tokens": 20, "decode_s": 5.6,
         "k_counts": {3: 5, 1: 1},
         "pass_costs": {"steps": 6, "drafted_positions": 10, "draft_s": 3.0, "target_s": 2.3,
                        "target_s_by_k": {3: 2.0, 1: 0.3}}}
    base = {"engine": "verispec", "mode": "target-only", "k": None, "new_tokens": 20, "decode_s": 9.0}
    add_priced([base, a, b])
    assert a["priced_tokens_per_s"] == pytest.approx(20 / (10 * 0.2 + 10 * 0.2 + 10 * 0.05))
    assert b["priced_tokens_per_s"] == pytest.approx(20 / (5 * 0.4 + 1 * 0.3 + 10 * 0.2 + 6 * 0.05))
    assert "priced_tokens_per_s" not in base


def test_predicted_speedup_is_leviathans_in_target_only_decode_steps():
    """Hand-worked: target-only 0.1 s a token; k=3 at a = 0.5: c = 0.02 s / 0.1 = 0.2, r = 0.12 s /
    0.1 = 1.2, so (1 + .5 + .25) / (0.2 * 2 + 1.2) = 1.09375 (SpecStats' formula); a mix of k pools
    expected tokens and costs over the passes as run."""
    from verispec.bench.e2e_report import add_predicted
    from verispec.spec.stats import predicted_speedup

    base = {"engine": "verispec", "mode": "target-only", "k": None, "new_tokens": 20, "decode_s": 2.0}
    fixed = {"engine": "verispec", "mode": "speculative", "k": 3, "acceptance_rate": 0.5, "k_counts": {3: 10},
             "pass_costs": {"steps": 10, "drafted_positions": 20, "draft_s": 0.4, "target_s": 1.2,
                            "target_s_by_k": {3: 1.2}}}
    mixed = {"engine": "verispec", "mode": "speculative", "k": "auto", "acceptance_rate": 0.5, "k_counts": {3: 2, 1: 1},
             "pass_costs": {"steps": 3, "drafted_positions": 4, "draft_s": 0.08, "target_s": 0.34,
                            "target_s_by_k": {3: 0.24, 1: 0.1}}}
    add_predicted([base, fixed, mixed])
    assert fixed["c"] == pytest.approx(0.2) and fixed["r_by_k"] == {3: pytest.approx(1.2)}
    assert fixed["predicted_speedup"] == pytest.approx(1.09375)
    assert fixed["predicted_speedup"] == pytest.approx(predicted_speedup(0.5, 3, 0.2, 1.2))
    assert mixed["predicted_speedup"] == pytest.approx((2 * 1.75 + 1) / (2 * (0.2 * 2 + 1.2) + 1 * 1.0))
    assert "predicted_speedup" not in base


def _path(k, seconds):
    rows = [{"new_tokens": 10, "decode_s": x} for x in seconds]
    return {"engine": "verispec", "mode": "speculative", "k": k, "new_tokens": 10 * len(rows),
            "decode_s": sum(seconds), "tokens_per_s": 10 * len(rows) / sum(seconds), "k_counts": {}, "per_prompt": rows}


def test_bootstrap_over_prompts_is_paired_and_resamples_the_best_fixed_k():
    """Two prompts, so a resample is one of four equally likely row pairs: the share of resamples in
    which k=auto is within 3% of that resample's best fixed k is recomputed here by enumerating them;
    an auto at 0.9x the best k on every prompt gives [0.9, 0.9] and no resample within 3%."""
    from itertools import product

    from verispec.bench.e2e_report import summarize

    k2, k3 = _path(2, [1.0, 2.0]), _path(3, [1.3, 1.4])
    auto = _path("auto", [1.02, 1.7])
    s = summarize([k2, k3, auto])
    rate = lambda p, pick: 10 * len(pick) / sum(p["per_prompt"][i]["decode_s"] for i in pick)  # noqa: E731
    exact = statistics.mean(rate(auto, pick) >= 0.97 * max(rate(k2, pick), rate(k3, pick)) for pick in product(range(2), repeat=2))
    assert s["best_fixed_k"] == 3 and s["auto_within_3pct_share"] == pytest.approx(exact, abs=0.04)
    lo, hi = s["auto_over_best_k_ci90"]
    ratios = sorted(rate(auto, pick) / rate(k3, pick) for pick in product(range(2), repeat=2))
    assert ratios[0] <= lo <= hi <= ratios[-1] and lo < hi
    slow = _path("auto", [1.3 / 0.9, 1.4 / 0.9])
    s = summarize([k2, k3, slow])
    assert s["auto_over_best_k_ci90"] == pytest.approx([0.9, 0.9]) and s["auto_within_3pct_share"] == 0.0
    one_prompt = summarize([_path(2, [1.0]), _path("auto", [1.0])])
    assert "auto_over_best_k_ci90" not in one_prompt  # nothing to resample


def test_run_interleaved_rotates_the_path_order_and_keeps_each_paths_results():
    from verispec.bench.e2e import run_interleaved

    calls = []

    def runner(name):
        def one(i, p):
            calls.append((i, name))
            return f"{name}{p}", {"i": i}, None

        return one, lambda rows, stats: {"name": name, "rows": rows}

    done = run_interleaved([runner("a"), runner("b"), runner("c")], ["x", "y", "z", "w"])
    assert [n for _, n in calls] == list("abc" "bca" "cab" "abc")
    assert [i for i, _ in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for (outs, path), name in zip(done, "abc"):  # results stay with their path, in prompt order
        assert outs == [f"{name}{p}" for p in "xyzw"] and path["name"] == name
        assert [r["i"] for r in path["rows"]] == [0, 1, 2, 3]


def test_run_interleaved_by_step_takes_turns_within_a_prompt():
    """With by_step, the runners that can step decode each prompt together, one step each in turn
    (the turn order rotated each round, a finished path leaving the turn); each keeps its own
    tokens and step seconds; a runner that cannot step runs whole at its place in the order."""
    from verispec.bench.e2e import run_interleaved

    calls, ends = [], {}

    def stepper(name, steps):
        def begin(i, p):
            for s in range(steps):
                calls.append(f"{name}{s}")
                yield {0: [f"{name}{p}{s}"]}

        def end(i, p, toks, secs):
            ends[(name, i)] = len(secs)
            return toks, {"i": i}, None

        return begin, end

    def runner(name, steps=None):
        def one(i, p):
            calls.append(f"{name}*")
            return [name], {"i": i}, None

        result = lambda rows, stats: {"name": name, "rows": rows}  # noqa: E731
        return (one, result) if steps is None else (one, result, stepper(name, steps))

    done = run_interleaved([runner("a", 2), runner("b", 3), runner("h")], ["x", "y"], by_step=True)
    # prompt 0: order a b h -> a, b step together (round 2 starts with b, round 3 has b alone), then h
    # prompt 1: order b h a -> the group runs at b's place: b first, then a; h after the group
    assert calls == ["a0", "b0", "b1", "a1", "b2", "h*", "b0", "a0", "a1", "b1", "b2", "h*"]
    assert ends == {("a", 0): 3, ("b", 0): 4, ("a", 1): 3, ("b", 1): 4}  # steps + the final StopIteration
    assert done[0][0] == [["ax0", "ax1"], ["ay0", "ay1"]] and done[1][0][1] == ["by0", "by1", "by2"]
    assert [r["i"] for r in done[2][1]["rows"]] == [0, 1] and done[2][0] == [["h"], ["h"]]


def test_bench_e2e_coupled_acceptor_gives_every_k_the_same_sampled_text(tiny_pair, tmp_path, capsys):
    """--acceptor coupled at T > 0: target-only samples on the same noise, and every fixed k and
    k=auto emit its tokens (fp32 tiny models), recorded per path; the acceptor is in the JSON and
    the table's title."""
    target, draft, _ = tiny_pair
    assert main(["bench", "e2e", "--target", target, "--draft", draft, "--ks", "2,3,5", "--auto", "--no-hf",
                 "--temperatures", "0.7", "--prompt-sets", "code", "--acceptor", "coupled", "--out-dir", str(tmp_path),
                 *TINY_ARGS, "--max-new-tokens", "12"]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["acceptor"] == "coupled"
    (run,) = data["runs"]
    spec = [p for p in run["paths"] if p["mode"] == "speculative"]
    assert [p["k"] for p in spec] == [2, 3, 5, "auto"]
    for p in spec:
        d = p["coupled_divergence"]
        assert d["prompts"] == 2 and d["diverged_prompts"] == 0, p["k"]
    assert "coupled_divergence" not in run["paths"][0]  # target-only is the reference
    assert "acceptor coupled" in capsys.readouterr().out


def test_bench_e2e_trees_and_block_chains_every_combination_the_generator_accepts(tiny_pair, tmp_path, capsys):
    """--chain-acceptors default,block runs each k under both; --trees runs each tree under every
    (acceptor, children) the generator accepts at T > 0 and once (multistep, top) at T = 0; the
    refused combinations are listed with their reasons; every path carries the verification fields,
    the flat-64 prediction, and the cell's summary compares chains, block chains and trees."""
    target, draft, _ = tiny_pair
    assert main(["bench", "e2e", "--target", target, "--draft", draft, "--ks", "2,3", "--no-auto", "--no-hf",
                 "--chain-acceptors", "default,block", "--trees", "2,1;dynamic:4", "--tree-depth-k", "3",
                 "--temperatures", "0,0.7", "--prompt-sets", "code", "--out-dir", str(tmp_path), *TINY_ARGS]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert (tmp_path / "e2e_flat64.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["verification"]["trees"] == ["2,1", "dynamic:4"] and data["verification"]["tree_depth_k"] == 3
    assert "predicted_speedup_flat64" in data["method"] and "64" in data["method"]["predicted_speedup_flat64"]
    chains = [("k=2", 2, "default"), ("k=2 block", 2, "block"), ("k=3", 3, "default"), ("k=3 block", 3, "block")]
    for run in data["runs"]:
        base, *spec = run["paths"]
        assert base["mode"] == "target-only"
        assert [(p["label"], p["k"], p["acceptor"]) for p in spec[:4]] == chains
        trees = [(p["tree"], p["acceptor"], p["children"]) for p in spec[4:]]
        skipped = {(x["tree"], x["acceptor"], x["children"]): x["reason"] for x in run["skipped"]}
        if run["temperature"] == 0:  # one path per tree: every exact acceptor keeps the same path at T=0
            assert trees == [("[2,1]", "multistep", "top"), ("dynamic:4", "multistep", "top")] and not skipped
        else:
            assert trees == [("[2,1]", a, c) for a, c in [("multistep", "sample"), ("multistep", "distinct"),
                                                          ("multistep", "top"), ("recursive", "distinct"),
                                                          ("traversal", "sample"), ("traversal", "distinct"),
                                                          ("traversal", "top")]] \
                + [("dynamic:4", "multistep", "top"), ("dynamic:4", "traversal", "top")]
            assert set(skipped) == {("2,1", "recursive", "sample"), ("2,1", "recursive", "top")} | {
                ("dynamic:4", a, c) for a in ("multistep", "recursive", "traversal") for c in ("sample", "distinct", "top")
                if (a, c) not in {("multistep", "top"), ("traversal", "top")}}
            assert "exact only for children" in skipped[("2,1", "recursive", "sample")]
            assert "is not exact" in skipped[("dynamic:4", "multistep", "sample")]
        for p in spec:
            assert [r["new_tokens"] for r in p["per_prompt"]] == [6, 6]
            assert 1 <= p["mean_tokens_per_pass"] <= p["k"] and p["tokens_per_s"] > 0
            assert p["verify"] == ("tree" if p["tree"] else "chain")
            counts = {int(t): n for t, n in p["verify_passes_by_tokens"].items()}
            assert sum(counts.values()) == p["pass_costs"]["steps"]  # every pass counted once, by tokens scored
            assert set(p["verify_s_per_pass_by_tokens"]) == set(p["verify_passes_by_tokens"])
            assert sum(p["verify_s_per_pass_by_tokens"][t] * n for t, n in p["verify_passes_by_tokens"].items()) \
                == pytest.approx(p["pass_costs"]["target_s"])
            if p["tree"]:
                assert p["nodes_per_pass"] > 1 and max(counts) == 5  # 4 nodes + the last token
                assert "tree_vs_same_depth_chain" in p and "priced_tokens_per_s" not in p
            else:
                assert p["nodes_per_pass"] is None and counts == {int(k): n for k, n in p["k_counts"].items()}
            # the flat-64 model: tokens per pass over c x levels + 1 (every pass scores < 64 tokens)
            assert p["flat64_verify_cost"] == 1.0
            assert p["levels_per_pass"] == pytest.approx(p["pass_costs"]["drafted_positions"] / p["pass_costs"]["steps"])
            assert p["predicted_speedup_flat64"] == pytest.approx(
                p["mean_tokens_per_pass"] / (p["c_per_level"] * p["levels_per_pass"] + 1))
            if run["temperature"] == 0:
                assert p["greedy_divergence"]["diverged_prompts"] == 0  # fp32: every tree and acceptor is exact
        v = run["summary"]["verification"]
        by_label = {p["label"]: p for p in spec}
        for k in (2, 3):
            assert v["block_gain"][str(k)] == pytest.approx(
                by_label[f"k={k} block"]["mean_tokens_per_pass"] / by_label[f"k={k}"]["mean_tokens_per_pass"])
        if run["temperature"] == 0:  # greedy ids: nothing to pair
            assert v["paired_block_gain"] is None and not any("paired_block_gain" in p for p in spec)
        else:  # every chain pass at T > 0 is paired, pooled per number of drafts over the cell's chains
            paired = v["paired_block_gain"]
            assert all("paired_block_gain" in p for p in spec[:4]) and not any("paired_block_gain" in p for p in spec[4:])
            assert paired["all"]["row_passes"] == sum(v2["row_passes"] for g, v2 in paired.items() if g != "all")
            assert paired["all"]["row_passes"] == sum(x["row_passes"] for p in spec[:4] for x in p["paired_block_gain"].values())
            for g, x in paired.items():
                if g != "all":
                    assert x["block_tokens_per_pass"] >= x["token_wise_tokens_per_pass"] - 1e-9
                    assert 1 <= x["token_wise_tokens_per_pass"] <= int(g) + 1
                    if g == "1":  # one draft: the rules coincide
                        assert x["gain"] == pytest.approx(1.0)
        tree_paths = [p for p in spec if p["tree"]]
        assert v["best_tree"]["tokens_per_s"]["tokens_per_s"] == max(p["tokens_per_s"] for p in tree_paths)
        assert v["best_block"]["mean_tokens_per_pass"]["label"] in ("k=2 block", "k=3 block")
        assert v["tree_vs_best_chain"] == pytest.approx(max(p["mean_tokens_per_pass"] for p in tree_paths)
                                                        / max(p["mean_tokens_per_pass"] for p in spec[:4]))
        static = [p for p in tree_paths if p["tree"] == "[2,1]"]
        for p in static:  # depth 2: against the better chain at k = 3
            assert p["tree_vs_same_depth_chain"] == pytest.approx(p["mean_tokens_per_pass"] / max(
                by_label["k=3"]["mean_tokens_per_pass"], by_label["k=3 block"]["mean_tokens_per_pass"]))
        assert run["summary"]["best_fixed_k"] in (2, 3)  # k=auto's reference: the token-wise chains of --acceptor
    printed = capsys.readouterr().out
    for text in ("k=3 block", "tree 2,1 traversal/sample", "block gain", "best tree tok/pass over best chain's",
                 "skipped, refused by the generator", "tree 2,1 recursive/sample", "flat64"):
        assert text in printed


def test_bench_e2e_auto_tree_runs_or_is_listed_as_refused(tiny_pair, tmp_path):
    """--auto-tree adds k='auto', tree='auto' where the generator accepts it; otherwise the cell
    lists it as skipped, with the generator's reason, and the rest still runs."""
    target, draft, _ = tiny_pair
    assert main(["bench", "e2e", "--target", target, "--draft", draft, "--ks", "2", "--no-auto", "--no-hf",
                 "--auto-tree", "--temperatures", "0.7", "--prompt-sets", "code", "--out-dir", str(tmp_path),
                 *TINY_ARGS]) == 0
    (run,) = json.loads((tmp_path / "e2e.json").read_text())["runs"]
    ran = [p for p in run["paths"] if p.get("label") == "k=auto tree=auto"]
    skipped = [x for x in run["skipped"] if x["label"] == "k=auto tree=auto"]
    assert len(ran) + len(skipped) == 1
    assert [p["k"] for p in run["paths"][1:2]] == [2]
    if ran:
        assert ran[0]["predicted_speedup_flat64"] > 0 and ran[0]["new_tokens"] == 12
    else:
        assert skipped[0]["reason"]


def test_bench_e2e_trees_need_a_draft_that_drafts_trees(tiny_pair, tmp_path, capsys):
    target, _, _ = tiny_pair
    assert main(["bench", "e2e", "--target", target, "--draft", "ngram", "--ks", "2", "--no-auto", "--no-hf",
                 "--trees", "2,1", "--out-dir", str(tmp_path), *TINY_ARGS]) == 1
    assert "--trees needs a draft that drafts token trees" in capsys.readouterr().err.replace("\n", " ")


def test_flat64_prediction_by_hand():
    """Target-only 0.1 s a token. A chain at k=4 (3 levels a pass), 2.5 tokens a pass, draft 0.006 s
    a level: c = 0.06, so 2.5 / (0.06 x 3 + 1) = 2.1186; a tree of depth 2 with 20 passes of 17
    tokens (dynamic:16), 3.2 tokens a pass, draft 0.02 s a level: 3.2 / (0.2 x 2 + 1) = 2.2857; a
    pass of 128 tokens costs 2 decode steps (flat to 64, then in proportion)."""
    from verispec.bench.e2e_report import add_flat64
    from verispec.spec.simulate import flat_verify_cost, predicted_speedup_flat

    base = {"engine": "verispec", "mode": "target-only", "k": None, "new_tokens": 20, "decode_s": 2.0,
            "tokens_per_s": 10.0}
    chain = {"engine": "verispec", "mode": "speculative", "k": 4, "mean_tokens_per_pass": 2.5, "k_counts": {4: 10},
             "verify_passes_by_tokens": {4: 10},
             "pass_costs": {"steps": 10, "drafted_positions": 30, "draft_s": 0.18, "target_s": 1.0,
                            "target_s_by_k": {4: 1.0}}}
    tree = {"engine": "verispec", "mode": "speculative", "k": 3, "verify": "tree", "tree": "dynamic:16",
            "mean_tokens_per_pass": 3.2, "k_counts": {3: 20}, "verify_passes_by_tokens": {17: 20},
            "pass_costs": {"steps": 20, "drafted_positions": 40, "draft_s": 0.8, "target_s": 3.0,
                           "target_s_by_k": {17: 3.0}}}
    wide = {**tree, "verify_passes_by_tokens": {128: 10, 17: 10}}
    add_flat64([base, chain, tree, wide])
    assert chain["c_per_level"] == pytest.approx(0.06) and chain["levels_per_pass"] == 3
    assert chain["predicted_speedup_flat64"] == pytest.approx(2.5 / 1.18)
    assert chain["predicted_tokens_per_s_flat64"] == pytest.approx(10 * 2.5 / 1.18)
    assert tree["c_per_level"] == pytest.approx(0.2) and tree["levels_per_pass"] == 2
    assert tree["predicted_speedup_flat64"] == pytest.approx(3.2 / 1.4)
    assert wide["flat64_verify_cost"] == pytest.approx(1.5)  # half the passes at 2 steps, half at 1
    assert wide["predicted_speedup_flat64"] == pytest.approx(3.2 / (0.4 + 1.5))
    assert flat_verify_cost(64) == 1.0 and flat_verify_cost(1) == 1.0 and flat_verify_cost(96) == 1.5
    assert predicted_speedup_flat(2.5, 0.06, 3) == pytest.approx(2.5 / 1.18)
    assert "predicted_speedup_flat64" not in base
    with pytest.raises(ValueError):
        predicted_speedup_flat(0.5, 0.1, 2)


def test_compare_verification_by_hand():
    from verispec.bench.e2e_report import compare_verification

    def path(label, k, acceptor, tpp, tps, tree=None):
        return {"engine": "verispec", "mode": "speculative", "label": label, "k": k, "acceptor": acceptor,
                "tree": tree, "verify": "tree" if tree else "chain", "mean_tokens_per_pass": tpp, "tokens_per_s": tps}

    paths = [path("k=3", 3, "default", 2.0, 30.0), path("k=5", 5, "default", 2.6, 28.0),
             path("k=3 block", 3, "block", 2.2, 29.0), path("k=5 block", 5, "block", 3.0, 27.0),
             path("tree a", 3, "multistep", 2.4, 25.0, "[2,1]"), path("tree b", 5, "traversal", 3.3, 26.0, "[2,2,1,1]"),
             {**path("k=auto", "auto", "default", 2.9, 40.0)}]
    v = compare_verification(paths)
    assert v["best_token_wise"]["tokens_per_s"]["label"] == "k=3"
    assert v["best_token_wise"]["mean_tokens_per_pass"]["label"] == "k=5"
    assert v["best_block"]["tokens_per_s"]["label"] == "k=3 block"
    assert v["best_tree"]["tokens_per_s"]["label"] == "tree b" and v["best_tree"]["mean_tokens_per_pass"]["k"] == 5
    assert v["block_gain"] == {3: pytest.approx(1.1), 5: pytest.approx(3.0 / 2.6)}
    assert v["tree_vs_best_chain"] == pytest.approx(3.3 / 3.0)
    assert v["tree_vs_same_depth_chain"] == {"tree a": pytest.approx(2.4 / 2.2), "tree b": pytest.approx(3.3 / 3.0)}
    assert v["paired_block_gain"] is None  # no path carries the probe's sums


def test_pool_paired_by_hand():
    from verispec.bench.e2e_report import pool_paired

    def probe(n, b, t):
        return {"row_passes": n, "block_tokens_per_pass": b, "token_wise_tokens_per_pass": t, "gain": b / t}

    pooled = pool_paired([{"paired_block_gain": {"2": probe(10, 2.2, 2.0), "4": probe(30, 3.0, 2.5)}},
                          {"paired_block_gain": {"4": probe(10, 3.4, 2.9)}}])
    assert pooled["2"] == {"row_passes": 10, "block_tokens_per_pass": pytest.approx(2.2),
                           "token_wise_tokens_per_pass": pytest.approx(2.0), "gain": pytest.approx(1.1)}
    assert pooled["4"]["row_passes"] == 40
    assert pooled["4"]["block_tokens_per_pass"] == pytest.approx((30 * 3.0 + 10 * 3.4) / 40)
    assert pooled["4"]["gain"] == pytest.approx((30 * 3.0 + 10 * 3.4) / (30 * 2.5 + 10 * 2.9))
    assert pooled["all"] == {"row_passes": 50, "gain": pytest.approx((22 + 90 + 34) / (20 + 75 + 29))}
    assert pool_paired([]) is None


def test_bench_tree_gain_pairs_trees_with_their_chains(tiny_pair, tmp_path, capsys):
    """verispec bench tree-gain on tiny models: every accepted (tree, acceptor, children) carries the
    tree's expected tokens per pass and, for sample/distinct, its gain over the first-child chain with
    a standard error; refused combinations are listed; chains carry both rules' expectations."""
    target, draft, _ = tiny_pair
    assert main(["bench", "tree-gain", "--target", target, "--draft", draft, "--trees", "2,1;1,1",
                 "--tree-acceptors", "recursive,traversal", "--tree-children", "sample,distinct", "--ks", "3",
                 "--prompts", "3", "--max-new-tokens", "10", "--samples", "4", "--amp", "f32", "--random-prompts",
                 "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tree_gain.json").read_text())
    assert (tmp_path / "tree_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["tree"], r["acceptor"], r["children"]) for r in data["trees"]] == [
        ("2,1", "recursive", "distinct"), ("2,1", "traversal", "sample"), ("2,1", "traversal", "distinct"),
        ("1,1", "recursive", "distinct"), ("1,1", "traversal", "sample"), ("1,1", "traversal", "distinct")]
    assert {(x["tree"], x["acceptor"], x["children"]) for x in data["skipped"]} == {("2,1", "recursive", "sample"),
                                                                                 ("1,1", "recursive", "sample")}
    for r in data["trees"]:
        assert r["row_passes"] > 0 and 1 <= r["tree_tokens_per_pass"] <= 3
        assert r["chain_block_tokens_per_pass"] >= r["chain_token_wise_tokens_per_pass"] - 1e-9
        assert r["gain_over_token_wise_chain"] == pytest.approx(r["tree_tokens_per_pass"] / r["chain_token_wise_tokens_per_pass"])
        if r["tree"] == "1,1" and r["acceptor"] == "traversal":  # a chain: traversal is block verification on it
            assert r["gain_over_block_chain"] == pytest.approx(1.0, abs=4 * r["gain_over_block_chain_se"] + 1e-9)
    (chain,) = data["chains"]
    assert chain["k"] == 3 and chain["block_tokens_per_pass"] >= chain["token_wise_tokens_per_pass"] - 1e-9
    assert data["best_chain_tokens_per_pass"] == pytest.approx(chain["block_tokens_per_pass"])
    for argv, msg in ((["--trees", "dynamic:8"], "static trees only"), (["--tree-children", "fan"], "unknown 'fan'"),
                      (["--ks", "1"], "must be >= 2"), (["--temperature", "0"], "must be > 0")):
        capsys.readouterr()
        assert main(["bench", "tree-gain", "--target", target, "--draft", draft, *argv, "--out-dir", str(tmp_path)]) != 0
        assert msg in capsys.readouterr().err
