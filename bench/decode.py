"""``verispec bench decode``: target-only decode speed at batch 1, next to the memory bandwidth
measured in the same run (JSON and a PNG bar chart in --out).

Batch-1 decode streams every weight matrix once per token, so its floor is
``weight bytes read per token / memory read bandwidth``. Reported per model and dtype:
tokens/s, weight bytes per token, achieved weight bandwidth (bytes/token x tokens/s) and that as
a fraction of the measured read bandwidth. The bandwidth of this kind of VM drifts by tens of
percent within minutes, so besides a measurement at the start and one before each row, the read
bandwidth is measured right before every timed run and each run's rate is set against its own
measurement ("paired"; the median over runs is reported), and, on CPU, as many more runs
interleave a read of one step's weight bytes with every decode step ("interleaved": the floor at
the very moments the steps ran; median and minimum over runs). KV-cache reads (small at these lengths) and
activations are not counted, so the fraction slightly understates the real traffic.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

DEFAULT_MODELS = "smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"
PROMPT = "def quicksort(arr):\n    "


def register(sub) -> None:
    p = sub.add_parser("decode", help="target-only decode tokens/s (batch 1) and achieved weight bandwidth")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated names, .gguf files or HF dirs")
    p.add_argument("--dtypes", default="bf16,f32",
                   help="comma-separated: f32, bf16, f16; AMP+int8 (e.g. bf16+int8) for int8 weights")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and dtype (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--bandwidth-bytes", type=int, default=1 << 30,
                   help="buffer size of the bandwidth measurement (and the most the interleaved probe allocates)")
    p.add_argument("--verify-context", type=int, default=VERIFY_CONTEXT,
                   help="cached tokens before the timed decode step and verify passes")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, run one more under cProfile and record where its time went")
    p.add_argument("--out", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


VERIFY_CONTEXT = 512  # default cached tokens before the timed decode/verify forwards
VERIFY_TS = (1, 2, 3, 4, 5, 6, 8)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table, of
    which a step reads one row; a tied LM head reads that table in full, so it counts once.
    With int8 weights: the int8 matrices, their scales and biases, and the norm weights."""
    decoder = model.decoder
    if getattr(model, "quant", None):
        from verispec.kernels.cpu.quant import forward_linears

        tensors = [t for owner, attr, _ in forward_linears(decoder) for t in getattr(owner, attr).buffers()]
        tensors += [m.weight for m in decoder.modules() if type(m).__name__ == "RMSNorm"]
        return sum(t.numel() * t.element_size() for t in tensors)
    total = sum(p.numel() * p.element_size() for p in decoder.parameters())  # tied tensors once
    embed = decoder.model.embed_tokens.weight
    if not model.config.tie_word_embeddings:
        total -= embed.numel() * embed.element_size()
    return total


def bench_one(name: str, amp: str, new_tokens: int, repeats: int, device: str, kernel_backend,
              context: int = VERIFY_CONTEXT, bandwidth=None, profile: bool = False, probe_bytes: int = 0) -> dict:
    """One model and dtype; ``bandwidth()`` (-> read GB/s), when given, runs before every timed run;
    with ``probe_bytes`` (CPU), ``repeats`` more runs interleave a read probe with every decode step
    (:func:`interleaved_runs`)."""
    import torch

    from verispec.model import LlamaForSampling, Tokenizer

    prompt = Tokenizer.from_pretrained(name).encode(PROMPT)
    t0 = time.perf_counter()
    dtype, _, quant = amp.partition("+")  # "bf16+int8": bf16 activations, int8 weights
    model = LlamaForSampling.from_pretrained(
        name, n_positions=max(len(prompt) + new_tokens, context + max(VERIFY_TS)), amp=dtype, device=device,
        kernel_backend=kernel_backend, quant=quant or None,
    )
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])  # [1, L]
    model.sample(ids, len(prompt) + min(4, new_tokens), temperature=0.0)  # warm-up
    rates, bws, outputs = [], [], None
    for _ in range(repeats):
        if bandwidth is not None:
            bws.append(bandwidth())
        out = model.sample(ids, len(prompt) + new_tokens, temperature=0.0)  # greedy, no EOS stop
        st = model.last_stats
        # the first new token comes from the prefill logits: new_tokens - 1 decode forwards
        rates.append((st["new_tokens"] - 1) / st["decode_s"])
        outputs = out
    tps = statistics.median(rates)
    wbytes = weight_bytes_per_token(model)
    paired = [wbytes * r / 1e9 / bw for r, bw in zip(rates, bws)]
    inter = interleaved_runs(model, ids, len(prompt) + new_tokens, wbytes, repeats, probe_bytes) if probe_bytes else []
    verify_ms = verify_pass_costs(model, context, repeats=max(5, 3 * repeats))
    profiled = profile_sample(model, ids, len(prompt) + new_tokens) if profile else None
    return {
        "profile": profiled,
        "model": name,
        "amp": amp,
        "device": device,
        "kernel_backend": model.kernels.name,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "load_s": load_s,
        "tokens_per_s": tps,
        "tokens_per_s_runs": rates,
        "weight_bytes_per_token": wbytes,
        "achieved_weight_GBps": wbytes * tps / 1e9,
        "read_GBps_paired": bws,  # measured just before each timed run
        "fraction_of_paired_read_bandwidth_runs": paired,
        "fraction_of_paired_read_bandwidth": statistics.median(paired) if paired else None,
        "interleaved_runs": inter,
        "fraction_of_interleaved_read_bandwidth_runs": [r["fraction"] for r in inter],
        "fraction_of_interleaved_read_bandwidth": statistics.median(r["fraction"] for r in inter) if inter else None,
        "sample_text": model.tokenizer.decode(outputs[0, len(prompt):].tolist()),
        "verify_context": context,
        "forward_ms_by_T": verify_ms,
        "verify_k5_over_decode": verify_ms[5] / verify_ms[1],
    }


def interleaved_runs(model, ids, sequence_length: int, wbytes: int, repeats: int, probe_bytes: int) -> list[dict]:
    """The floor measured at the same moments as the decode steps: ``repeats`` greedy runs
    (``model.stream``) in which every decode step is followed by a native streaming read of
    ``wbytes`` bytes (a ``probe_bytes`` buffer, read as often as it takes), the time a read of
    one step's weight bytes takes right then. Per run: the floor time over the steps' time, both
    summed over the run's decode steps (the first step, which holds the prefill, and the last,
    which runs no forward, are left out). This VM's bandwidth drifts within a second, so a probe
    a few seconds before a run can be far from what the run saw; this one is never more than a
    step away. The probe evicts the caches between steps (KV cache, activations), which if
    anything slows the steps: a conservative pairing."""
    import torch

    from verispec.kernels import cpu as native

    n = min(probe_bytes, wbytes) // 4 // 4096 * 4096
    buf = torch.ones(max(n, 4096), dtype=torch.float32)
    reads = max(1, round(wbytes / (buf.numel() * 4)))
    native.stream_read(buf)  # fault the pages in
    out = []
    for _ in range(repeats):
        out.append(_interleaved_run(model.stream(ids, sequence_length, temperature=0.0), wbytes, buf, reads, native))
    return out


def _interleaved_run(it, wbytes: int, buf, reads: int, native) -> dict:
    """One run of :func:`interleaved_runs` over the stream ``it``."""
    steps, floors = [], []
    next(it)  # the prefill and the first decode step
    while True:
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(reads):
            native.stream_read(buf)
        floors.append(wbytes * (time.perf_counter() - t) / (reads * buf.numel() * 4))
    steps, floors = steps[:-1], floors[:-1]  # the last yield ran no forward
    return {"steps": len(steps), "step_s": sum(steps), "floor_s": sum(floors), "fraction": sum(floors) / sum(steps),
            "read_GBps": wbytes * len(floors) / sum(floors) / 1e9, "tokens_per_s": len(steps) / sum(steps)}


def profile_sample(model, ids, sequence_length: int, top: int = 12) -> dict:
    """One greedy ``sample`` under cProfile: its total seconds, the seconds spent in the kernel
    backend's code (own time of functions in the ``verispec.kernels`` package, which includes the
    native calls they make), and the ``top`` functions by own time. cProfile slows Python code,
    not native code, so the kernels' share is, if anything, understated."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    model.sample(ids, sequence_length, temperature=0.0)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
    total = sum(own for _, _, own, _, _ in stats.values())
    import verispec.kernels

    root = str(Path(verispec.kernels.__file__).resolve().parent)
    kernels_s = sum(own for (f, _, _), (_, _, own, _, _) in stats.items() if str(Path(f).resolve()).startswith(root))
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"total_s": total, "kernel_backend_s": kernels_s, "kernel_backend_share": kernels_s / total if total else None,
            "top_own_time": [{"function": f"{Path(f).name}:{line}({fn})", "calls": calls, "own_s": own, "cumulative_s": cum}
                             for (f, line, fn), (calls, _, own, cum, _) in rows]}


def verify_pass_costs(model, context: int, repeats: int) -> dict:
    """Median ms of one forward over T tokens after ``context`` cached tokens, T in VERIFY_TS
    (T = 1 is a decode step, T = k a k-token verify pass); the T values interleave, so a drift of
    the machine's speed touches all of them alike."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, context + max(VERIFY_TS)), generator=gen)  # [1, S]
    model.reset()
    model.prefill([ids[0, :context]])
    pos = torch.tensor([context])
    times = {T: [] for T in VERIFY_TS}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for T in VERIFY_TS:
            t0 = time.perf_counter()
            model.forward(ids[:, context : context + T], pos)  # rewrites the same slots each time
            times[T].append(time.perf_counter() - t0)
    return {T: 1e3 * statistics.median(ts[1:]) for T, ts in times.items()}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .common import measure_memory_bandwidth, write_json

    if args.new_tokens < 2 or args.repeats < 1 or args.verify_context < 1:
        raise ValueError("--new-tokens must be at least 2, --repeats and --verify-context at least 1")
    if args.bandwidth_bytes < 1 << 16:
        raise ValueError(f"--bandwidth-bytes must be at least 65536 (64 KiB), got {args.bandwidth_bytes}")
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    console = Console()
    bw = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)
    console.print(f"memory bandwidth ({args.device}): read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    rows = []
    for name in models:
        for amp in dtypes:
            # this VM's bandwidth drifts by tens of percent within minutes: each row also gets its own
            # measurement, taken just before it, and its fraction of the lower of the two
            near = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)
            r = bench_one(name, amp, args.new_tokens, args.repeats, args.device, args.kernel_backend, args.verify_context,
                          bandwidth=lambda: measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)["read_GBps"],
                          profile=args.profile, probe_bytes=args.bandwidth_bytes if _native_probe(args.device) else 0)
            r["memory_bandwidth_before"] = near
            r["fraction_of_read_bandwidth"] = r["achieved_weight_GBps"] / bw["read_GBps"]
            r["fraction_of_nearby_read_bandwidth"] = r["achieved_weight_GBps"] / min(near["read_GBps"], bw["read_GBps"])
            rows.append(r)
    bw_after = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)
    command = "verispec " + " ".join(getattr(args, "argv", None) or ["bench", "decode"])
    path = write_json("decode", {"command": command, "memory_bandwidth": bw, "memory_bandwidth_after": bw_after,
                                 "prompt": PROMPT, "results": rows}, args.out)
    plot = _plot(rows, bw, path.with_suffix(".png"))
    table = Table("model", "amp", "tokens/s", "MB/token", "weight GB/s", "% of read BW", "% of nearby BW",
                  "% of paired BW", "% of interleaved BW (min)", f"verify k=5 / decode @{args.verify_context}")
    for r in rows:
        table.add_row(r["model"], r["amp"], f"{r['tokens_per_s']:.2f}", f"{r['weight_bytes_per_token'] / 1e6:.1f}",
                      f"{r['achieved_weight_GBps']:.2f}", f"{100 * r['fraction_of_read_bandwidth']:.1f}",
                      f"{100 * r['fraction_of_nearby_read_bandwidth']:.1f}",
                      f"{100 * r['fraction_of_paired_read_bandwidth']:.1f}",
                      _interleaved_cell(r),
                      f"{r['verify_k5_over_decode']:.2f}x")
    console.print(table)
    for r in rows:
        if r["profile"]:
            pr = r["profile"]
            console.print(f"{r['model']} {r['amp']} under cProfile: {pr['total_s']:.2f} s, of which the kernel "
                          f"backend's code {pr['kernel_backend_s']:.2f} s "
                          f"({100 * pr['kernel_backend_share']:.0f}%)")
    console.print(f"wrote {path} and {plot}")
    return 0


def _native_probe(device: str) -> bool:
    from verispec.kernels import cpu as native

    return str(device) == "cpu" and native.available()


def _interleaved_cell(r: dict) -> str:
    runs = r["fraction_of_interleaved_read_bandwidth_runs"]
    return f"{100 * r['fraction_of_interleaved_read_bandwidth']:.1f} ({100 * min(runs):.1f})" if runs else "-"


def _plot(rows: list[dict], bw: dict, out):
    """Achieved weight bandwidth per model and dtype against the measured read bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{Path(r['model']).name[:22]}\n{r['amp']}" for r in rows]  # a path shows its file name
    fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(rows)), 4))
    bars = ax.bar(labels, [r["achieved_weight_GBps"] for r in rows], color="tab:blue")
    ax.axhline(bw["read_GBps"], color="tab:red", linestyle="--", label=f"measured read {bw['read_GBps']:.1f} GB/s")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_s']:.1f} tok/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("weight bytes/token x tokens/s (GB/s)")
    ax.set_title("batch-1 decode: achieved weight bandwidth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
