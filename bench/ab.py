"""``verispec bench ab``: one benchmark run alternately on two installs of verispec ("before" and
"after" a change) in one session: per-round values of each side, medians, the ratio
after/before and a verdict against a tolerance (JSON and a PNG in --out).

Each side is a Python interpreter whose environment imports the verispec to measure (a venv with
``pip install -e CHECKOUT``). Round 1 runs before then after, round 2 after then before, and so on
(ABBA...), so a drift of the machine's speed touches both sides alike; every run is a fresh
process that writes its JSON into a folder of its own. Before the first round each interpreter
says where its verispec lives (that checkout's commit is recorded) and builds or loads its native
CPU kernels, so no timed run pays for a compile and the two sides' libraries can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

E2E_K = 6  # best fixed k of the W8A8 pair on greedy code in every such run of bench/results (r2_ids, g, p8_h)


def decode_metrics(data: dict) -> dict[str, tuple[float, bool]]:
    """bench decode's JSON -> {name: (value, judged)}: decode tokens/s of every model and dtype."""
    return {f"decode_tokens_per_s[{r['model']}/{r['amp']}]": (r["tokens_per_s"], True) for r in data["results"]}


def e2e_metrics(data: dict) -> dict[str, tuple[float, bool]]:
    """bench e2e's JSON -> {name: (value, judged)}: decode tokens/s of every speculative path
    (judged) and of target-only (recorded, not judged), per prompt set and temperature."""
    out = {}
    for run in data["runs"]:
        cell = f"{run['prompt_set']}/T={run['temperature']:g}"
        for p in run["paths"]:
            if p["engine"] == "verispec" and p["mode"] == "speculative":
                out[f"speculative_tokens_per_s[{cell}/k={p['k']}]"] = (p["tokens_per_s"], True)
            elif p["engine"] == "verispec":
                out[f"target_only_tokens_per_s[{cell}]"] = (p["tokens_per_s"], False)
    return out


@dataclass(frozen=True)
class Preset:
    args: list[str]  # after ``python -P -m verispec``
    out_option: str  # the benchmark's results-folder option
    result: str  # the JSON file the benchmark writes there
    metrics: Callable[[dict], dict[str, tuple[float, bool]]]


PRESETS = {
    "decode": Preset(["bench", "decode", "--models", "smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b",
                      "--dtypes", "bf16", "--repeats", "1"], "--out", "decode.json", decode_metrics),
    "e2e-greedy-code": Preset(["bench", "e2e", "--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b",
                               "--draft-quant", "w8a8", "--ks", str(E2E_K), "--no-auto", "--temperatures", "0",
                               "--prompt-sets", "code", "--prompts", "8", "--max-new-tokens", "96", "--amp", "bf16",
                               "--no-hf", "--repeats", "1", "--name", "ab_e2e"], "--out-dir", "ab_e2e.json", e2e_metrics),
}

# Run by each side's interpreter before the rounds: where its verispec is, and its native library
# (built now if missing). Written against no more of verispec than the import and, if it is there,
# kernels/cpu/build.py, so it still answers for a tree that moved things.
PROBE = r"""
import glob, hashlib, json, os, sys
info = {"executable": sys.executable, "python": sys.version.split()[0]}
import verispec
info["verispec"] = verispec.__file__
try:
    import torch
    info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
except Exception as e:
    info["torch"] = repr(e)
try:
    from verispec.kernels.cpu import build
    lib = build.get_lib()
    info["native_library"] = getattr(lib, "_name", None)
    info["native_error"] = getattr(build, "_error", None)
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(os.path.dirname(build.__file__), "*.[ch]"))):
        h.update(os.path.basename(p).encode() + open(p, "rb").read())
    info["native_sources_sha256"] = h.hexdigest()
except Exception as e:
    info["native_error"] = repr(e)
print("VERISPEC_AB_PROBE " + json.dumps(info))
"""


def register(sub) -> None:
    p = sub.add_parser("ab", help="one benchmark alternately on two installs (before/after a change): medians, "
                                  "ratio, verdict")
    p.add_argument("--before", required=True, help="Python interpreter of the 'before' install")
    p.add_argument("--after", required=True, help="Python interpreter of the 'after' install")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="the benchmark command and its metric: decode (tokens/s per model, bf16), e2e-greedy-code "
                        f"(speculative tokens/s at k={E2E_K}, W8A8 draft, greedy, code prompts)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs both sides once")
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="pass when every judged metric's after median >= (1 - tolerance) x its before median")
    p.add_argument("--out", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.add_argument("--name", default=None, help="results file stem (default ab_PRESET)")
    p.add_argument("--env-before", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the before side only (repeatable), e.g. VERISPEC_HOME=...")
    p.add_argument("--env-after", action="append", default=[], metavar="KEY=VALUE", help="the same for the after side")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="appended to every run's benchmark command (a later option wins), e.g. "
                        "-- --models smollm2-135m --new-tokens 8")
    p.set_defaults(func=run)


def schedule(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in run order: AB BA AB BA ..."""
    sides = ("before", "after")
    return [(r, sides[(i + r) % 2]) for r in range(rounds) for i in range(2)]


def _env(pairs: list[str], option: str) -> dict[str, str]:
    out = {}
    for kv in pairs:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise ValueError(f"{option} takes KEY=VALUE, got {kv!r}")
        out[key] = value
    return out


def _git(folder: str, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "loadavg": os.getloadavg()}


def probe(python: str, env: dict) -> dict:
    """What ``python`` imports as verispec: the file, the checkout and its commit, torch, the native library."""
    res = subprocess.run([python, "-P", "-c", PROBE], capture_output=True, text=True, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("VERISPEC_AB_PROBE ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"{python} cannot import verispec (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    info = json.loads(line.split(" ", 1)[1])
    folder = str(Path(info["verispec"]).parent)
    info["checkout"] = _git(folder, "rev-parse", "--show-toplevel")
    info["commit"] = _git(folder, "rev-parse", "HEAD")
    if info["checkout"]:
        info["uncommitted_changes"] = _git(folder, "diff", "--shortstat", "HEAD") or ""
    return info


def _check_native(sides: dict) -> str:
    b, a = sides["before"], sides["after"]
    lib_b, lib_a = b.get("native_library"), a.get("native_library")
    if not (lib_b and lib_a):
        return f"not compared: a side has no native library (before: {b.get('native_error')}, after: {a.get('native_error')})"
    same_src = b.get("native_sources_sha256") == a.get("native_sources_sha256")
    if lib_b == lib_a and not same_src:
        raise RuntimeError(f"both sides load {lib_b} although their kernel sources differ: give one side its own "
                           "cache with --env-after VERISPEC_HOME=... (or --env-before)")
    if lib_b == lib_a:
        return "one library, shared: the two sides' kernel sources are identical"
    return "separate libraries" + ("" if not same_src else " (identical kernel sources)")


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], tolerance: float) -> dict:
    """Per metric: each side's values in round order, medians, after/before, per-round ratios, verdict."""
    names = list(dict.fromkeys(n for r in runs for n in r["metrics"]))
    out = {}
    for n in names:
        vals = {s: [r["metrics"][n] for r in runs if r["side"] == s and n in r["metrics"]] for s in ("before", "after")}
        by_round = {(r["round"], r["side"]): r["metrics"].get(n) for r in runs}
        pairs = [(by_round.get((i, "before")), by_round.get((i, "after"))) for i in sorted({r["round"] for r in runs})]
        m_b, m_a = _median(vals["before"]), _median(vals["after"])
        ratio = m_a / m_b if m_b and m_a is not None else None
        judged = any(r["judged"].get(n) for r in runs)
        out[n] = {"judged": judged, "before": vals["before"], "after": vals["after"], "before_median": m_b,
                  "after_median": m_a, "ratio": ratio,
                  "round_ratios": [a / b for b, a in pairs if a is not None and b],
                  "pass": (ratio is not None and ratio >= 1 - tolerance) if judged else None}
        out[n]["round_ratio_median"] = _median(out[n]["round_ratios"])
    return out


def _find_result(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if path.exists():
        return path
    found = sorted(run_dir.rglob("*.json"))  # an option passed through (--name) may have renamed it
    if len(found) == 1:
        return found[0]
    raise RuntimeError(f"the run wrote no {name} into {run_dir} (found {[str(p) for p in found]})")


def run(args) -> int:
    from rich.console import Console

    if args.rounds < 1 or not 0 <= args.tolerance < 1:
        raise ValueError(f"--rounds must be >= 1 and --tolerance in [0, 1), got {args.rounds} and {args.tolerance}")
    preset = PRESETS[args.preset]
    extra = args.bench_args[1:] if args.bench_args[:1] == ["--"] else list(args.bench_args)
    pythons = {"before": args.before, "after": args.after}
    side_env = {"before": _env(args.env_before, "--env-before"), "after": _env(args.env_after, "--env-after")}
    out = Path(args.out or os.environ.get("VERISPEC_RESULTS") or "bench-results").resolve()
    name = args.name or f"ab_{args.preset.replace('-', '_')}"
    runs_dir = out / f"{name}_runs"
    order = schedule(args.rounds)

    def command(side: str, run_dir: Path) -> list[str]:
        return [pythons[side], "-P", "-m", "verispec", *preset.args, preset.out_option, str(run_dir), *extra]

    console = Console()
    if args.dry_run:
        for r, side in order:
            console.print(f"round {r + 1} {side}: {shlex.join(command(side, runs_dir / f'r{r + 1:02d}_{side}'))}",
                          markup=False, highlight=False, soft_wrap=True)
        return 0

    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    envs = {s: {**base_env, **side_env[s]} for s in pythons}
    sides = {s: probe(pythons[s], envs[s]) for s in pythons}
    for s, info in sides.items():
        dirty = ", with uncommitted changes" if info.get("uncommitted_changes") else ""
        console.print(f"{s}: {info['verispec']} (commit {info['commit']}{dirty}); native library "
                      f"{info.get('native_library')}", markup=False, highlight=False, soft_wrap=True)
    native = _check_native(sides)
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        console.print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: the machine is not idle",
                      highlight=False)
    shutil.rmtree(runs_dir, ignore_errors=True)  # this driver's own folders of an earlier session
    out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": "ab", "preset": args.preset, "command": "verispec " + shlex.join(getattr(args, "argv", [])),
            "tolerance": args.tolerance, "rounds": args.rounds, "order": [s for _, s in order], "machine": _machine(),
            "sides": sides, "side_env": side_env, "native_libraries": native, "runs": [], "metrics": {},
            "complete": False}
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    for i, (r, side) in enumerate(order):
        run_dir = runs_dir / f"r{r + 1:02d}_{side}"
        row = run_one(command(side, run_dir), run_dir, envs[side], preset, f"round {r + 1} {side}")
        data["runs"].append({"round": r, "side": side, **row})
        console.print(f"[{i + 1}/{len(order)}] round {r + 1} {side} ({row['wall_s']:.0f} s): "
                      + ", ".join(f"{n} {v:.2f}" for n, v in row["metrics"].items()),
                      markup=False, highlight=False, soft_wrap=True)
        data["metrics"] = summarize(data["runs"], args.tolerance)
        path.write_text(json.dumps(data, indent=2) + "\n")  # after every run: a stopped session keeps its rounds
    judged = [m for m in data["metrics"].values() if m["judged"]]
    data.update(complete=True, passed=bool(judged) and all(m["pass"] for m in judged),
                machine_after={"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()})
    path.write_text(json.dumps(data, indent=2) + "\n")
    plot = _plot(data, path.with_suffix(".png"))
    _print_report(console, data, [path] + ([plot] if plot else []))
    return 0 if data["passed"] else 1


def run_one(cmd: list[str], run_dir: Path, env: dict, preset: Preset, label: str) -> dict:
    """One benchmark process, its output in ``run_dir``/log.txt; its metrics read from its JSON."""
    run_dir.mkdir(parents=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:  # VERISPEC_RESULTS: a default results folder lands here too
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "VERISPEC_RESULTS": str(run_dir)}).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{label} exited {rc}: {shlex.join(cmd)}; {run_dir / 'log.txt'} ends: " + " | ".join(tail))
    result = _find_result(run_dir, preset.result)
    try:
        metrics = preset.metrics(json.loads(result.read_text()))
    except (KeyError, TypeError) as e:
        raise RuntimeError(f"{result} lacks what the preset reads ({e!r})") from None
    return {"command": shlex.join(cmd), "wall_s": wall, "loadavg_1min_before": load, "json": str(result),
            "metrics": {n: v for n, (v, _) in metrics.items()}, "judged": {n: j for n, (_, j) in metrics.items()}}


def _print_report(console, data: dict, files: list[Path]) -> None:
    from rich.markup import escape
    from rich.table import Column, Table

    table = Table(Column("metric", overflow="fold"), "before median", "after median", "after/before",
                  "round ratios (median)", "verdict")
    for n, m in data["metrics"].items():
        verdict = "-" if not m["judged"] else ("pass" if m["pass"] else "FAIL")
        table.add_row(escape(n), _fmt(m["before_median"]), _fmt(m["after_median"]), _fmt(m["ratio"], 3),
                      _fmt(m["round_ratio_median"], 3), verdict)
    console.print(table)
    console.print(f"{'PASS' if data['passed'] else 'FAIL'}: every judged metric's after median within "
                  f"{100 * data['tolerance']:g}% of its before median or above; wrote "
                  + " and ".join(map(str, files)), markup=False, highlight=False, soft_wrap=True)


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _plot(data: dict, out: Path) -> Path | None:
    """Each judged metric's values in run order, before and after, with their medians."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    names = [n for n, m in data["metrics"].items() if m["judged"]]
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.4 * len(names) + 0.4), squeeze=False)
    for ax, n in zip(axes[:, 0], names):
        m = data["metrics"][n]
        for side, color in (("before", "tab:gray"), ("after", "tab:blue")):
            xs = [i + 1 for i, r in enumerate(data["runs"]) if r["side"] == side and n in r["metrics"]]
            ax.plot(xs, m[side], "o", color=color, label=side)
            if m[f"{side}_median"] is not None:
                ax.axhline(m[f"{side}_median"], color=color, linestyle="--", linewidth=1)
        ax.set_title(f"{n}: after/before {_fmt(m['ratio'], 3)} ({'pass' if m['pass'] else 'FAIL'})", fontsize=9)
        ax.set_xlabel("run (in time order)", fontsize=8)
        ax.set_ylabel("tokens/s", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
