"""``verispec bench policy``: k-policies against every fixed k in the simulator (spec/simulate.py).

No model runs: the costs (draft step, verify pass as a function of k, the draft's catch-up after
k = 1 passes) and the per-position acceptance are given, so a change to AdaptiveK can be judged in
seconds over many seeds, where a real ``bench e2e`` cell takes minutes and moves 5-15% with the
machine. Three scenarios, each run by one policy from start to end (as one engine would serve
them): the four e2e cells (code then prose, greedy then T=0.7, with the acceptance measured at
k = 8 in bench/results/e2e_int8.json), a switch from code to chat-like prompts and back, and drafts
that seldom pay. Per cell: each policy's mean tokens/s over the seeds against the best and the
median fixed k (their means over the same seeds), its share of k = 1 passes, and the share of
seeds in which its single run is within 3% of the best single fixed-k run of that seed (how often
one ``bench e2e`` cell would show it within 3%).

``--verify-ms-by-k`` replaces the linear verify cost with a measured curve (ms for k = 1..8, e.g.
the fixed-k paths' pass costs of a ``bench e2e`` run); ``--drift`` multiplies every cost by the
machine's speed over simulated time (a log-normal process, ``--drift-s`` its correlation time),
which is what a k-policy's cost table must not mistake for the cost of the k it happened to run
then ("auto level=off" is the table without the level, for comparison); ``--calibration-ms-by-k``
is what k=auto's calibration measures instead of the true costs (a start taken while the machine
was busy), against which "auto explore=off" shows what the gate's exploration of stale pass
lengths buys.

``--traces FILE`` (from ``verispec bench traces``) adds a scenario that replays real greedy texts
instead of modelled acceptance: which drafts a pass accepts is then what the pair did on the bench
prompts, for any k, and only the costs are modelled. Where the file holds the draft's confidences,
k=auto's drafting gate hears them ("auto gate=off" is the policy without it); in the modelled
scenarios there are none, so the two columns agree there.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .common import machine_info, write_json

SCENARIOS = {
    "e2e cells": [("code/0", (0.98, 0.93, 0.97, 0.84, 0.95), 3), ("code/0.7", (0.96, 0.93, 0.97, 0.82, 0.94), 3),
                  ("prose/0", (0.73, 0.75, 0.86, 0.75, 0.77, 0.8, 0.6), 3),
                  ("prose/0.7", (0.72, 0.81, 0.78, 0.82, 0.67, 0.78, 0.57), 3)],
    "code, chat, code": [("code", (0.97,), 6), ("chat", (0.5,), 3), ("code again", (0.97,), 3)],
    "drafts seldom pay": [("low", (0.45, 0.4), 6)],
}
VARIANTS = {  # name -> AdaptiveK keyword arguments
    "auto": {},
    "auto gate=off": {"gate": False},
    "auto carry_cap=inf": {"carry_cap": float("inf")},
    "auto carry=0": {"carry": 0.0},
    "auto explore_from_1=8": {"explore_from_1": 8},
    "auto level=off": {"verify_level_window": 0},
    "auto explore=off": {"explore_every": 10**9},
}


def register(sub) -> None:
    p = sub.add_parser("policy", help="k=auto variants against every fixed k in the k-policy simulator (no model)")
    p.add_argument("--draft-ms", type=float, default=30.0, help="one draft step (default: int8 0.5B on 2 cores)")
    p.add_argument("--verify-ms", type=float, default=72.0, help="one-token target pass (default: bf16 1.5B)")
    p.add_argument("--verify-slope", type=float, default=0.1, help="extra verify cost per extra token, relative")
    p.add_argument("--catch-up", type=float, default=0.15, help="extra draft-forward cost per skipped token, relative")
    p.add_argument("--overhead-ms", type=float, default=2.0, help="per-pass overhead")
    p.add_argument("--noise", type=float, default=0.1, help="log-normal sigma on every timed cost")
    p.add_argument("--verify-ms-by-k", default=None,
                   help="measured verify pass ms for k = 1..8, comma-separated (replaces --verify-ms/--verify-slope)")
    p.add_argument("--calibration-ms-by-k", default=None,
                   help="what k=auto's calibration measures for k = 1..8 (ms, comma-separated), e.g. a measured start "
                        "that went wrong; default: the true verify costs")
    p.add_argument("--drift", type=float, default=0.0,
                   help="log-normal sigma of the machine's speed over time (multiplies every cost)")
    p.add_argument("--drift-s", type=float, default=20.0, help="correlation time of that drift, simulated seconds")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens per call (prompt)")
    p.add_argument("--seeds", type=int, default=30, help="runs per policy; means are compared")
    p.add_argument("--traces", default=None,
                   help="a `verispec bench traces` JSON: adds a scenario replaying its greedy traces (one cell per "
                        "prompt set, each call one recorded prompt; only the costs are modelled)")
    p.add_argument("--name", default="policy_sim", help="results file stem")
    p.add_argument("--out-dir", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


def _parse_ms_by_k(text: str | None, option: str) -> tuple[float, ...]:
    """``"82,92,...,117"`` (ms for k = 1..8) -> seconds; () when not given."""
    if text is None:
        return ()
    try:
        ms = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers (ms for k = 1..8)") from None
    if len(ms) != 8:
        raise ValueError(f"{option} needs 8 values (k = 1..8), got {len(ms)}")
    return tuple(x / 1e3 for x in ms)


def _trace_workloads(path: str, new_tokens: int) -> list:
    """One greedy-replay workload per prompt set of a ``bench traces`` file."""
    import json

    from verispec.spec.simulate import Workload

    try:
        data = json.loads(Path(path).read_text())
        traces = data["traces"]
    except FileNotFoundError:
        raise ValueError(f"--traces {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--traces {path}: not a `verispec bench traces` JSON (no 'traces' table)") from None
    if not isinstance(traces, dict) or not traces:
        raise ValueError(f"--traces {path}: 'traces' must map prompt sets to lists of traces")
    confidence = data.get("confidence") or {}  # absent in files recorded before the drafting gate
    if not isinstance(confidence, dict):
        raise ValueError(f"--traces {path}: 'confidence' must map prompt sets to lists of confidences")
    return [Workload.from_traces(f"{name}/0", ts, new_tokens, confidence.get(name)) for name, ts in traces.items()]


def _mean_outcomes(make, workloads, costs, seeds):
    from verispec.spec.simulate import simulate

    runs = [simulate(make(), workloads, costs, seed=s) for s in range(seeds)]
    return [{"tokens_per_s": statistics.mean(r[i].tokens_per_s for r in runs),
             "tokens_per_s_per_seed": [r[i].tokens_per_s for r in runs],
             "k1_share": sum(r[i].k_counts.get(1, 0) for r in runs) / sum(sum(r[i].k_counts.values()) for r in runs)}
            for i in range(len(workloads))]


def _single_runs(policy: dict, fixed: dict, i: int) -> float:
    """Share of seeds where the policy's run is within 3% of the largest of the fixed k's runs
    (k = 2..8) with that seed: the test ``bench e2e`` applies to one run, where the best fixed k is
    itself the maximum of noisy figures."""
    seeds = range(len(policy["tokens_per_s_per_seed"]))
    return sum(policy["tokens_per_s_per_seed"][s] >= 0.97 * max(fixed[k][i]["tokens_per_s_per_seed"][s]
                                                              for k in range(2, 9)) for s in seeds) / len(seeds)


def run(args) -> int:
    from verispec.spec.policy import AdaptiveK
    from verispec.spec.simulate import Costs, Workload

    if args.seeds < 1 or args.new_tokens < 1:
        raise ValueError(f"--seeds and --new-tokens must be >= 1, got {args.seeds}, {args.new_tokens}")
    by_k = _parse_ms_by_k(args.verify_ms_by_k, "--verify-ms-by-k")
    costs = Costs(draft_s=args.draft_ms / 1e3, verify_s=by_k[0] if by_k else args.verify_ms / 1e3,
                  verify_slope=args.verify_slope, catch_up=args.catch_up, overhead_s=args.overhead_ms / 1e3,
                  noise=args.noise, drift=args.drift, drift_s=args.drift_s, verify_by_k=by_k,
                  calibration_by_k=_parse_ms_by_k(args.calibration_ms_by_k, "--calibration-ms-by-k"))
    scenarios = {scenario: [Workload(name, acc, calls=calls, new_tokens=args.new_tokens) for name, acc, calls in cells]
                 for scenario, cells in SCENARIOS.items()}
    if args.traces:
        scenarios[f"traces {Path(args.traces).name}"] = _trace_workloads(args.traces, args.new_tokens)
    rows = []
    for scenario, workloads in scenarios.items():
        fixed = {k: _mean_outcomes(lambda k=k: k, workloads, costs, args.seeds) for k in range(1, 9)}
        variants = {name: _mean_outcomes(lambda kw=kw: AdaptiveK(**kw), workloads, costs, args.seeds)
                    for name, kw in VARIANTS.items()}
        for i, w in enumerate(workloads):
            rates = {k: f[i]["tokens_per_s"] for k, f in fixed.items()}
            best_k = max(rates, key=rates.get)
            median = statistics.median(rates[k] for k in range(2, 9))
            rows.append({"scenario": scenario, "cell": w.name, "acceptance": list(w.acceptance) or "greedy traces",
                         "calls": w.calls,
                         "fixed_tokens_per_s": rates, "best_fixed_k": best_k, "median_fixed_2_8": median,
                         "fixed_tokens_per_s_per_seed": {k: f[i]["tokens_per_s_per_seed"] for k, f in fixed.items()},
                         "policies": {name: {**v[i], "over_best": v[i]["tokens_per_s"] / rates[best_k],
                                             "beats_median": v[i]["tokens_per_s"] > median,
                                             "single_run_within_3pct": _single_runs(v[i], fixed, i)}
                                      for name, v in variants.items()}})
    data = {"benchmark": "policy", "machine": machine_info(), "costs": costs.__dict__, "new_tokens": args.new_tokens,
            "traces": args.traces,
            "seeds": args.seeds, "variants": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in VARIANTS.items()},
            "cells": rows}
    path = write_json(args.name, data, args.out_dir)
    _print(rows, path)
    return 0


def _print(rows, path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 260))
    table = Table(title="k-policies in the simulator: mean tokens/s over seeds / best fixed k's "
                        "(k=1 share; share of single runs within 3% of that seed's best fixed k)")
    for col in ("scenario", "cell", "best fixed k"):
        table.add_column(col, justify="right", no_wrap=True)
    for col in VARIANTS:  # long names fold in the header, never in the cells
        table.add_column(col.replace(" ", "\n", 1), justify="right", no_wrap=True)
    for r in rows:
        cells = [f"{p['over_best']:.3f}{'' if p['beats_median'] else ' <med'} ({p['k1_share']:.2f}; "
                 f"{p['single_run_within_3pct']:.2f})"
                 for p in r["policies"].values()]
        table.add_row(r["scenario"], r["cell"], str(r["best_fixed_k"]), *cells)
    console.print(table)
    console.print("<med: not above the median fixed k (2..8); a model of costs and acceptance, not a measurement")
    console.print(f"wrote {path}")
