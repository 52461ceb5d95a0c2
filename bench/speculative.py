"""``verispec bench speculative``: acceptance and speedup of speculative decoding against
target-only decoding, for a range of k and temperatures.

Per (temperature, k): acceptance rate, mean tokens per verify pass, tokens/s, the measured
end-to-end speedup (speculative tokens/s over target-only tokens/s, same prompts, batch 1),
the in-run speedup (SpecStats.measured_speedup, against a one-token decode step timed in the
same run), and the predicted one (Leviathan's formula with a, c, r measured in the run).
At temperature 0 it also reports how often the speculative output diverges from target-only
greedy output (expected 0 in fp32; bf16 verify and decode use different matmul shapes).
Also: achieved weight bandwidth of target-only decoding against a bandwidth measured here.
"""

from __future__ import annotations

import time

from .common import (
    bench_prompts,
    greedy_divergence,
    is_model_draft,
    load_model,
    measure_memory_bandwidth,
    parse_floats,
    results_dir,
    weight_bytes,
    write_json,
)


def register(sub) -> None:
    p = sub.add_parser("speculative", help="acceptance and speedup table for a draft/target pair")
    p.add_argument("--target", default="qwen2.5-coder-1.5b", help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="model name/path, 'self:N' or 'ngram'")
    p.add_argument("--ks", default="2,3,4,5,6,7,8", help="comma-separated k values")
    p.add_argument("--temperatures", default="0,0.7", help="comma-separated temperatures")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--prompt-set", default="code", help="prompt set of bench/prompts.json (code, prose)")
    p.add_argument("--prompts", type=int, default=4, help="how many prompts of the set to use")
    p.add_argument("--random-prompts", action="store_true", help="random token prompts (models without tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help="buffer size of the bandwidth measurement")
    p.add_argument("--name", default="speculative", help="results file stem")
    p.add_argument("--out-dir", default=None, help="results directory (default bench/results/)")
    p.set_defaults(func=run)


def _target_only(target, prompts, new_tokens, temperature, seed):
    outs, tokens, seconds = [], 0, 0.0
    for i, p in enumerate(prompts):
        out = target.sample(p[None], len(p) + new_tokens, temperature=temperature, seed=seed + i)
        outs.append(out[0])
        tokens += target.last_stats["new_tokens"]
        seconds += target.last_stats["decode_s"]
    return outs, tokens / seconds


def _speculative(gen, prompts, new_tokens, temperature, seed):
    outs, agg = [], dict(accepted=0, proposed=0, passes=0, new=0, decode_s=0.0, draft_s=0.0, target_s=0.0,
                         in_run=[], predicted=[], c=[], r=[])
    for i, p in enumerate(prompts):
        res = gen.generate(p[None], len(p) + new_tokens, temperature=temperature, seed=seed + i)
        s = res.stats
        outs.append(res.tokens[0])
        agg["accepted"] += s.accepted_drafts
        agg["proposed"] += s.proposed_drafts
        agg["passes"] += s.row_passes
        agg["new"] += s.new_tokens
        for key in ("decode_s", "draft_s", "target_s"):
            agg[key] += getattr(s, key)
        c, r = s.cost_ratios
        for key, v in (("in_run", s.measured_speedup), ("predicted", s.predicted_speedup), ("c", c), ("r", r)):
            if v is not None:
                agg[key].append(v)
    return outs, agg


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from verispec.spec import SpeculativeGenerator

    console = Console()
    ks = [int(k) for k in parse_floats(args.ks, "ks")]
    temps = parse_floats(args.temperatures, "temperatures")
    from verispec.model import open_source

    # room for the fixed prompts (< 256 tokens with a chat template), the new tokens and one verify block
    n_positions = min(256 + args.max_new_tokens + max(ks), open_source(args.target)[0].max_position_embeddings)
    target = load_model(args.target, args, n_positions)
    draft = load_model(args.draft, args, n_positions) if is_model_draft(args.draft) else args.draft
    prompts = bench_prompts(args.prompt_set, args.prompts, None if args.random_prompts else target.tokenizer,
                            target.vocab_size if args.random_prompts else None, args.seed)
    bandwidth = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)
    target_weight_bytes = weight_bytes(target)

    # warm-up: one short run of each path, so one-off costs are not timed
    target.sample(prompts[0][None], len(prompts[0]) + 2, temperature=0)
    SpeculativeGenerator(draft, target, ks[0]).sample(prompts[0][None], len(prompts[0]) + 2, temperature=0)

    rows = []
    for temp in temps:
        ref_outs, base_tps = _target_only(target, prompts, args.max_new_tokens, temp, args.seed)
        baseline = {"temperature": temp, "tokens_per_s": base_tps,
                    "achieved_GBps": target_weight_bytes * base_tps / 1e9}
        for k in ks:
            t0 = time.perf_counter()
            outs, agg = _speculative(SpeculativeGenerator(draft, target, k), prompts, args.max_new_tokens, temp, args.seed)
            tps = agg["new"] / agg["decode_s"]
            row = {
                "temperature": temp, "k": k,
                "acceptance_rate": agg["accepted"] / agg["proposed"] if agg["proposed"] else None,
                "mean_tokens_per_pass": (agg["accepted"] + agg["passes"]) / agg["passes"],
                "tokens_per_s": tps, "baseline_tokens_per_s": base_tps,
                "speedup_measured": tps / base_tps,
                "speedup_in_run": _mean(agg["in_run"]), "speedup_predicted": _mean(agg["predicted"]),
                "c": _mean(agg["c"]), "r": _mean(agg["r"]),
                "draft_s": agg["draft_s"], "target_s": agg["target_s"], "wall_s": time.perf_counter() - t0,
            }
            if temp == 0:
                row["greedy_divergence"] = greedy_divergence(outs, ref_outs, prompts)
            rows.append(row)
        rows.append({"baseline": baseline})

    data = {
        "target": str(args.target), "draft": str(args.draft), "amp": args.amp, "device": args.device,
        "max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "weight_bytes": target_weight_bytes,
        "memory_bandwidth": bandwidth, "results": rows,
        "command": "verispec bench speculative " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                          if k in ("target", "draft", "ks", "temperatures",
                                                                   "max_new_tokens", "amp", "device")),
    }
    path = write_json(args.name, data, args.out_dir)
    png = _plot(rows, results_dir(args.out_dir) / f"{args.name}.png", f"{args.draft} -> {args.target} ({args.amp})")

    table = Table(title=f"{args.draft} -> {args.target}, {args.amp}, {args.device}")
    for col in ("T", "k", "accept", "tok/pass", "tok/s", "speedup", "in-run", "predicted", "diverged"):
        table.add_column(col, justify="right", no_wrap=True)
    notes = []
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for row in rows:
        if "baseline" in row:
            b = row["baseline"]
            table.add_row(fmt(b["temperature"], "{:g}"), "target", "", "", fmt(b["tokens_per_s"]), "1.00", "", "", "")
            notes.append(f"T={b['temperature']:g} target-only: {b['achieved_GBps']:.2f} GB/s of weights read, "
                         f"{bandwidth['read_GBps']:.1f} GB/s measured read bandwidth")
            continue
        div = row.get("greedy_divergence")
        table.add_row(fmt(row["temperature"], "{:g}"), str(row["k"]), fmt(row["acceptance_rate"], "{:.3f}"),
                      fmt(row["mean_tokens_per_pass"]), fmt(row["tokens_per_s"]), fmt(row["speedup_measured"]),
                      fmt(row["speedup_in_run"]), fmt(row["speedup_predicted"]),
                      f"{div['diverged_prompts']}/{div['prompts']}" if div else "")
    console.print(table)
    for line in notes:
        console.print(line)
    console.print(f"wrote {path} and {png}")
    return 0


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    for temp in sorted({r["temperature"] for r in rows if "k" in r}):
        sel = [r for r in rows if r.get("temperature") == temp and "k" in r]
        ks = [r["k"] for r in sel]
        ax_a.plot(ks, [r["acceptance_rate"] for r in sel], "o-", label=f"T={temp:g}")
        ax_s.plot(ks, [r["speedup_measured"] for r in sel], "o-", label=f"measured, T={temp:g}")
        ax_s.plot(ks, [r["speedup_predicted"] for r in sel], "x--", label=f"predicted, T={temp:g}")
    ax_a.set(xlabel="k (tokens per verify pass)", ylabel="acceptance rate", ylim=(0, 1))
    ax_s.set(xlabel="k (tokens per verify pass)", ylabel="speedup over target-only")
    ax_s.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax_a, ax_s):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
