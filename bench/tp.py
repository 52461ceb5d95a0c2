"""``verispec bench tp``: target-only and speculative tokens/s at tp_degree 1 and 2, with per-rank
memory (resident set size and parameter bytes).

Each tp_degree runs in fresh processes (``run_ranks``: torchrun's environment, gloo on CPU), so
the memory figures are those of one rank alone. The draft runs with tp_degree=1 (replicated on
every rank) unless ``--draft-tp`` says otherwise. Greedy decoding on fixed prompt ids, so the
tokens of every tp_degree can be compared with tp_degree=1's. On a machine with few cores a
speedup is not expected: the ranks share the same cores and memory bandwidth.
"""

from __future__ import annotations

import hashlib
import os
import time

DEFAULTS = dict(target="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b")


def register(sub) -> None:
    p = sub.add_parser("tp", help="tokens/s and per-rank memory at tensor-parallel degrees 1 and 2")
    p.add_argument("--target", default=DEFAULTS["target"], help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default=DEFAULTS["draft"], help="draft model; 'none' for target-only")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tp_degree values to run")
    p.add_argument("--draft-tp", default="1", help="draft tp_degree: 1 (replicated on every rank) or 'same'")
    p.add_argument("--k", type=int, default=4, help="tokens scored per verify pass")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--threads-per-rank", type=int, default=None, help="default: CPU cores / tp_degree")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per tp_degree")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the memory-bandwidth probe")
    p.add_argument("--out-dir", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.add_argument("--name", default="tp", help="result file name (NAME.json, NAME.png)")
    p.set_defaults(func=run)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this address space; getrusage's ru_maxrss survives exec, so a spawned rank
    # would report its parent's peak
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.decoder.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _digest(tokens) -> str:
    return hashlib.sha256(str(tokens.tolist()).encode()).hexdigest()[:16]


def _bench_rank(rank: int, world: int, opts: dict) -> dict:
    """One rank of one tp_degree: load, warm up, time target-only and speculative greedy decoding."""
    import torch

    from verispec.model import LlamaForSampling

    out = {"rank": rank, "rss_start_bytes": _rss_bytes()}
    t0 = time.perf_counter()
    target = LlamaForSampling.from_pretrained(opts["target"], n_positions=opts["n_positions"], amp=opts["amp"],
                                              tp_degree=world)
    out["target_load_s"] = time.perf_counter() - t0
    out["target_param_bytes"] = _param_bytes(target)
    out["kv_cache_bytes"] = target.cache.nbytes
    ids = torch.randint(0, target.vocab_size, (1, opts["prompt_len"]), generator=torch.Generator().manual_seed(0))
    length = opts["prompt_len"] + opts["new_tokens"]

    target.sample(ids, opts["prompt_len"] + 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    tokens = target.sample(ids, length, temperature=0)
    wall = time.perf_counter() - t0
    out["target_only"] = {**target.last_stats, "wall_s": wall, "digest": _digest(tokens)}
    out["rss_after_target_bytes"] = _rss_bytes()

    if opts["draft"] is not None:
        out["speculative"] = _speculative(target, ids, length, opts, world)
    out["rss_end_bytes"] = _rss_bytes()
    out["peak_rss_bytes"] = _peak_rss_bytes()
    return out


def _speculative(target, ids, length: int, opts: dict, world: int) -> dict:
    try:
        from verispec.spec import SpeculativeGenerator
    except ImportError as e:
        return {"ran": False, "reason": f"verispec.spec.SpeculativeGenerator is not available ({e})"}
    from verispec.model import LlamaForSampling

    draft_tp = world if opts["draft_tp"] == "same" else int(opts["draft_tp"])
    t0 = time.perf_counter()
    draft = LlamaForSampling.from_pretrained(opts["draft"], n_positions=opts["n_positions"], amp=opts["amp"],
                                             tp_degree=draft_tp)
    load_s = time.perf_counter() - t0
    gen = SpeculativeGenerator(draft, target, opts["k"])
    gen.sample(ids, opts["prompt_len"] + 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    tokens = gen.sample(ids, length, temperature=0)
    wall = time.perf_counter() - t0
    stats = gen.last_stats.to_dict() if gen.last_stats is not None else {}
    new = int(tokens.shape[1]) - ids.shape[1]
    return {"ran": True, "draft_tp_degree": draft_tp, "draft_load_s": load_s, "draft_param_bytes": _param_bytes(draft),
            "wall_s": wall, "new_tokens": new, "tokens_per_s_wall": new / wall, "digest": _digest(tokens),
            "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list))}}


def run(args) -> int:
    from verispec.bench.common import machine_info, measure_memory_bandwidth, write_json
    from verispec.model import open_source
    from verispec.parallel.launch import run_ranks
    from verispec.parallel.plan import check_tp_degree

    for n in args.tp:
        if n < 1:
            raise ValueError(f"--tp values must be positive, got {n}")
    if args.draft_tp not in ("same",) and not args.draft_tp.isdigit():
        raise ValueError(f"--draft-tp must be an integer or 'same', got {args.draft_tp!r}")
    # resolve (fetch) the models once here, not in every rank, and reject a bad split early
    config = open_source(args.target, progress=True)[0]
    for n in args.tp:
        check_tp_degree(config, n)
    draft = None if args.draft.lower() == "none" else args.draft
    if draft is not None:
        open_source(draft, progress=True)
    opts = dict(target=args.target, draft=draft, draft_tp=args.draft_tp, k=args.k, amp=args.amp,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                n_positions=args.prompt_len + args.new_tokens + 2 * args.k + 8)
    cores = os.cpu_count() or 1
    bandwidth = measure_memory_bandwidth("cpu", nbytes=args.bandwidth_mib << 20)
    runs = []
    for n in args.tp:
        threads = args.threads_per_rank or max(1, cores // n)
        results = run_ranks(_bench_rank, n, (opts,), timeout_s=args.timeout, threads_per_rank=threads)
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"tp_degree={n}: rank {failed[0].rank} failed: {failed[0].error}\n{failed[0].traceback or ''}")
        ranks = [r.value for r in results]
        runs.append(_summarize(n, threads, ranks, bandwidth))
        print(_line(runs[-1]))
    base = runs[0]
    for r in runs:
        r["target_tokens_identical_to_first"] = r["target_only"]["digest"] == base["target_only"]["digest"]
        if (r.get("speculative") or {}).get("ran"):  # greedy: speculative must decode what the target does
            r["speculative_tokens_identical_to_target_only"] = r["speculative"]["digest"] == r["target_only"]["digest"]
    data = {"options": opts, "memory_bandwidth": bandwidth, "runs": runs,
            "note": "greedy decoding on fixed prompt ids; tokens/s from each rank's rank-0 timing"}
    path = write_json(args.name, data, args.out_dir)
    _plot(runs, path.with_suffix(".png"), machine_info())
    print(f"wrote {path}")
    return 0


def _summarize(n: int, threads: int, ranks: list[dict], bandwidth: dict) -> dict:
    r0 = ranks[0]
    weights = sum(r["target_param_bytes"] for r in ranks)  # bytes read per decoded token, all ranks
    tps = r0["target_only"]["tokens_per_s"]
    summary = {
        "tp_degree": n,
        "threads_per_rank": threads,
        "target_only": {"tokens_per_s": tps, "digest": r0["target_only"]["digest"],
                        "achieved_GBps": weights * tps / 1e9, "measured_read_GBps": bandwidth["read_GBps"]},
        "per_rank": [{k: v for k, v in r.items() if k not in ("target_only", "speculative")} for r in ranks],
    }
    if "speculative" in r0:
        summary["speculative"] = r0["speculative"]
    return summary


def _line(run: dict) -> str:
    spec = run.get("speculative") or {}
    spec_txt = f"{spec['tokens_per_s_wall']:.2f} tok/s" if spec.get("ran") else f"not run ({spec.get('reason', 'no draft')})"
    mem = ", ".join(f"rank {r['rank']}: {r['peak_rss_bytes'] / 2**20:.0f} MiB peak RSS, "
                    f"{r['target_param_bytes'] / 2**20:.1f} MiB params" for r in run["per_rank"])
    return f"tp_degree={run['tp_degree']}: target-only {run['target_only']['tokens_per_s']:.2f} tok/s; speculative {spec_txt}; {mem}"


def _plot(runs: list[dict], path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"tp={r['tp_degree']}" for r in runs]
    x = range(len(runs))
    ax1.bar([i - 0.2 for i in x], [r["target_only"]["tokens_per_s"] for r in runs], 0.4, label="target only")
    spec = [(r.get("speculative") or {}).get("tokens_per_s_wall", 0) for r in runs]
    if any(spec):
        ax1.bar([i + 0.2 for i in x], spec, 0.4, label="speculative")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("tokens/s")
    ax1.legend()
    for i, r in enumerate(runs):
        for j, rank in enumerate(r["per_rank"]):
            ax2.bar(i + (j - (len(r["per_rank"]) - 1) / 2) * 0.2, rank["peak_rss_bytes"] / 2**20, 0.18,
                    color="C2" if j == 0 else "C3")
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("peak RSS per rank (MiB)")
    fig.suptitle(f"tensor parallelism, {machine['cpu']} ({machine['cpu_count']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
