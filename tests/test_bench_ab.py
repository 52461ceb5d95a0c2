"""``verispec bench ab`` with two fake interpreters: small scripts that answer the driver's probe
and write a benchmark JSON holding known values, so medians, ratios, verdicts and the run order
are checked without a model."""

import json
import subprocess
import sys
import textwrap

import pytest

from verispec.bench.ab import schedule
from verispec.cli import main as cli_main

FAKE = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    SIDE, VALUES, LOG, PKG, LIB, FAIL_RUN = {side!r}, {values!r}, {log!r}, {pkg!r}, {lib!r}, {fail_run!r}
    args = sys.argv[1:]
    assert args[0] == "-P", args
    if args[1] == "-c":  # the driver's probe
        print("VERISPEC_AB_PROBE " + json.dumps({{"executable": sys.executable, "verispec": PKG + "/verispec/__init__.py",
              "native_library": LIB, "native_sources_sha256": SIDE}}))
        sys.exit(0)
    assert args[1:4] == ["-m", "verispec", "bench"], args
    with open(LOG, "a+") as f:
        f.seek(0)
        n = sum(json.loads(line)["side"] == SIDE for line in f)  # this side's earlier runs
        f.write(json.dumps({{"side": SIDE, "argv": args, "results_env": os.environ["VERISPEC_RESULTS"]}}) + "\\n")
    if n == FAIL_RUN:
        sys.exit(3)
    v = VALUES[n]
    if args[4] == "decode":
        out = args[args.index("--out") + 1]
        data = {{"results": [{{"model": "m1", "amp": "bf16", "tokens_per_s": v}},
                             {{"model": "m2", "amp": "bf16", "tokens_per_s": 2 * v}}]}}
        name = "decode"
    else:
        out = args[args.index("--out-dir") + 1]
        name = args[len(args) - 1 - args[::-1].index("--name") + 1]  # the last --name wins, as in argparse
        paths = [{{"engine": "verispec", "mode": "target-only", "k": None, "tokens_per_s": v * v / 100}},
                 {{"engine": "verispec", "mode": "speculative", "k": 6, "tokens_per_s": v}}]
        data = {{"runs": [{{"prompt_set": "code", "temperature": 0.0, "paths": paths}}]}}
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(data, f)
""")


def _checkout(path, message):
    """A git repository with one commit, standing for a side's checkout; returns its commit."""
    (path / "verispec").mkdir(parents=True)
    (path / "verispec" / "__init__.py").write_text("")
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], check=True)
    return subprocess.run(git[:3] + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def _fakes(tmp_path, before, after, fail=None, same_lib=False):
    log = tmp_path / "calls.jsonl"
    pythons, commits = {}, {}
    for side, values in (("before", before), ("after", after)):
        commits[side] = _checkout(tmp_path / f"checkout_{side}", side)
        lib = "/cache/native-same.so" if same_lib else f"/cache/native-{side}.so"
        script = tmp_path / f"python_{side}"
        script.write_text(FAKE.format(python=sys.executable, side=side, values=values, log=str(log),
                                      pkg=str(tmp_path / f"checkout_{side}"), lib=lib,
                                      fail_run=fail[1] if fail and fail[0] == side else None))
        script.chmod(0o755)
        pythons[side] = str(script)
    return pythons, commits, log


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_schedule_alternates_abba():
    assert [s for _, s in schedule(4)] == ["before", "after", "after", "before"] * 2
    assert [r for r, _ in schedule(2)] == [0, 0, 1, 1]


@pytest.mark.parametrize("after,tolerance,passed", [
    ([99.0, 80.0, 120.0], 0.03, True),    # after median 99: 0.99 of 100
    ([96.0, 99.0, 90.0], 0.03, False),    # after median 96: 0.96
    ([96.0, 99.0, 90.0], 0.05, True),
])
def test_decode_preset_medians_ratio_verdict(tmp_path, after, tolerance, passed):
    pythons, commits, log = _fakes(tmp_path, [100.0, 110.0, 90.0], after)
    out = tmp_path / "results"
    rc = cli_main(["bench", "ab", "--before", pythons["before"], "--after", pythons["after"], "--preset", "decode",
                   "--rounds", "3", "--tolerance", str(tolerance), "--out", str(out), "--",
                   "--models", "m1,m2", "--new-tokens", "8"])
    assert rc == (0 if passed else 1)
    data = json.loads((out / "ab_decode.json").read_text())
    assert data["complete"] and data["passed"] is passed
    assert (out / "ab_decode.png").stat().st_size > 0
    # ABBA: the order of the calls the fakes saw, and the order recorded
    calls = _calls(log)
    assert [c["side"] for c in calls] == ["before", "after", "after", "before", "before", "after"] == data["order"]
    # each run: the preset's command, its own results folder, the passed-through options last
    dirs = set()
    for c, r in zip(calls, data["runs"]):
        argv = c["argv"]
        assert argv[:5] == ["-P", "-m", "verispec", "bench", "decode"]
        assert argv[-4:] == ["--models", "m1,m2", "--new-tokens", "8"]
        assert ["--dtypes", "bf16"] == argv[argv.index("--dtypes"):argv.index("--dtypes") + 2]
        out_dir = argv[argv.index("--out") + 1]
        assert c["results_env"] == out_dir and r["json"] == f"{out_dir}/decode.json"
        dirs.add(out_dir)
    assert len(dirs) == 6
    m1, m2 = data["metrics"]["decode_tokens_per_s[m1/bf16]"], data["metrics"]["decode_tokens_per_s[m2/bf16]"]
    assert m1["before"] == [100.0, 110.0, 90.0] and m1["after"] == after  # in round order
    assert m1["before_median"] == 100.0 and m1["after_median"] == sorted(after)[1]
    assert m1["ratio"] == pytest.approx(sorted(after)[1] / 100.0) == m2["ratio"]
    assert m2["before_median"] == 200.0
    assert m1["round_ratios"] == pytest.approx([a / b for a, b in zip(after, [100.0, 110.0, 90.0])])
    assert m1["judged"] and m1["pass"] is passed and m2["pass"] is passed
    assert data["sides"]["before"]["commit"] == commits["before"] != commits["after"] == data["sides"]["after"]["commit"]
    assert data["sides"]["after"]["checkout"] == str(tmp_path / "checkout_after")
    assert data["machine"]["cores"] and data["native_libraries"].startswith("separate")


def test_e2e_preset_judges_speculative_only(tmp_path):
    # speculative k=6 0.98 of before: within 3%; target-only (recorded, not judged) 0.96
    pythons, _, log = _fakes(tmp_path, [50.0, 50.0], [49.0, 50.0])
    out = tmp_path / "results"
    rc = cli_main(["bench", "ab", "--before", pythons["before"], "--after", pythons["after"], "--preset",
                   "e2e-greedy-code", "--rounds", "1", "--out", str(out), "--name", "e2e_ab"])
    assert rc == 0
    data = json.loads((out / "e2e_ab.json").read_text())
    argv = _calls(log)[0]["argv"]
    for opt, value in [("--ks", "6"), ("--draft-quant", "w8a8"), ("--temperatures", "0"), ("--prompt-sets", "code"),
                       ("--prompts", "8"), ("--max-new-tokens", "96"), ("--repeats", "1")]:
        assert argv[argv.index(opt) + 1] == value
    assert "--no-hf" in argv and "--no-auto" in argv
    spec = data["metrics"]["speculative_tokens_per_s[code/T=0/k=6]"]
    assert spec["judged"] and spec["ratio"] == pytest.approx(0.98) and spec["pass"]
    target = data["metrics"]["target_only_tokens_per_s[code/T=0]"]
    assert not target["judged"] and target["pass"] is None and target["ratio"] == pytest.approx(0.98 ** 2)
    assert data["passed"]


def test_failed_run_stops_with_its_log(tmp_path, capsys):
    pythons, _, log = _fakes(tmp_path, [1.0, 1.0], [1.0, 1.0], fail=("after", 1))
    out = tmp_path / "results"
    rc = cli_main(["bench", "ab", "--before", pythons["before"], "--after", pythons["after"], "--preset", "decode",
                   "--rounds", "2", "--out", str(out)])
    assert rc == 1
    assert "round 2 after exited 3" in " ".join(capsys.readouterr().err.split())
    assert len(_calls(log)) == 3  # before, after, then the failed after
    data = json.loads((out / "ab_decode.json").read_text())  # the rounds before the failure are kept
    assert not data["complete"] and len(data["runs"]) == 2


def test_one_native_library_for_different_sources_is_refused(tmp_path, capsys):
    pythons, _, log = _fakes(tmp_path, [1.0], [1.0], same_lib=True)
    rc = cli_main(["bench", "ab", "--before", pythons["before"], "--after", pythons["after"], "--preset", "decode",
                   "--rounds", "1", "--out", str(tmp_path / "results")])
    assert rc == 1 and "VERISPEC_HOME" in capsys.readouterr().err
    assert not log.exists()  # refused before any run
