"""``verispec bench stages``: where a decode step and a verify pass spend their time, stage by
stage of the native layer (kernels/cpu/fused.c), after ``--context`` cached tokens.

The native kernels are built a second time with ``-DSTAGE_TIMING`` (fused.c then adds each
layer stage's seconds into ``verispec_stage_s``) and used for this benchmark only; the library
the rest of the process uses is put back afterwards. For each T in ``--ts`` (1 = a decode step,
k = a k-token verify pass), interleaved so that a drift of the machine's speed touches every T
alike: the forward's wall time, each stage's time summed over the layers, the time outside the
layers (embedding, final norm, LM head and the Python around them), and for the four weight
products their weight GB/s. The timing adds 12 clock reads a layer (tens of ns each).
"""

from __future__ import annotations

import statistics
import time

STAGES = ["norm", "qkv", "rope_append", "attention", "transpose", "o", "add_norm", "gate_up", "silu_mul", "down",
          "residual_add"]
PRODUCTS = {"qkv", "o", "gate_up", "down"}


def register(sub) -> None:
    p = sub.add_parser("stages", help="per-stage time of a decode step and of verify passes (native CPU layer)")
    p.add_argument("--models", default="qwen2.5-coder-0.5b", help="comma-separated names, .gguf files or HF dirs")
    p.add_argument("--amp", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--context", type=int, default=512, help="cached tokens before the timed forwards")
    p.add_argument("--ts", default="1,5", help="comma-separated tokens per forward (1..16)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per T and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all T (medians reported)")
    p.add_argument("--out", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


def timing_library():
    """The native kernels built with -DSTAGE_TIMING (a library of their own, cached like the
    normal one) and its ``verispec_stage_s`` array."""
    import ctypes

    from verispec.kernels.cpu import build

    flags = build.EXTRA_FLAGS
    try:
        build.EXTRA_FLAGS = [*flags, "-DSTAGE_TIMING"]
        lib = build._build()
    finally:
        build.EXTRA_FLAGS = flags
    return lib, (ctypes.c_double * 16).in_dll(lib, "verispec_stage_s")


def product_bytes(config, elem: int) -> dict:
    """Weight bytes each of the four products reads per forward, all layers."""
    E, F, D, L = config.hidden_size, config.intermediate_size, config.head_dim, config.num_hidden_layers
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    return {"qkv": L * (H + 2 * H_kv) * D * E * elem, "o": L * H * D * E * elem, "gate_up": L * 2 * F * E * elem,
            "down": L * F * E * elem}


def stage_profile(model, stage_s, context: int, ts: list[int], repeats: int, rounds: int) -> dict:
    """{T: {"forward_ms", "stages_ms": {stage: ms}, "outside_layers_ms"}} (medians over rounds) for
    forwards of T tokens after ``context`` cached ones; ``stage_s`` is the timing library's array."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, context + max(ts)), generator=gen)
    model.reset()
    model.prefill([ids[0, :context]])
    pos = torch.tensor([context])
    per = {T: {"forward": [], "stages": {s: [] for s in STAGES}} for T in ts}
    for rnd in range(rounds + 1):  # the first round is a warm-up
        for T in ts:
            for i in range(len(stage_s)):
                stage_s[i] = 0.0
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.forward(ids[:, context : context + T], pos)  # rewrites the same slots each time
            wall = (time.perf_counter() - t0) / repeats
            if rnd == 0:
                continue
            if not any(stage_s[i] for i in range(len(STAGES))):
                raise RuntimeError("no stage time was recorded: the forward did not run the fused native layer "
                                   "(it needs the cpu kernel backend, bf16 or f32, T <= 16 and a C compiler)")
            per[T]["forward"].append(wall)
            for i, s in enumerate(STAGES):
                per[T]["stages"][s].append(stage_s[i] / repeats)
    out = {}
    for T, d in per.items():
        stages = {s: 1e3 * statistics.median(v) for s, v in d["stages"].items()}
        fwd = 1e3 * statistics.median(d["forward"])
        out[T] = {"forward_ms": fwd, "stages_ms": stages, "outside_layers_ms": fwd - sum(stages.values())}
    return out


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from verispec.kernels.cpu import build
    from verispec.model import LlamaForSampling

    from .common import write_json

    ts = [int(t) for t in args.ts.split(",") if t]
    if not ts or any(not 1 <= t <= 16 for t in ts):
        raise ValueError(f"--ts must be tokens per forward in 1..16, got {args.ts!r}")
    if args.context < 1 or args.repeats < 1 or args.rounds < 1:
        raise ValueError("--context, --repeats and --rounds must be at least 1")
    if build.get_lib() is None:
        raise RuntimeError(f"the native CPU kernels are unavailable: {build.build_error()}")
    lib, stage_s = timing_library()
    console = Console()
    rows = []
    saved = build._lib
    try:
        build._lib = lib  # every native call of this process goes to the timing build until restored
        for name in [m for m in args.models.split(",") if m]:
            model = LlamaForSampling.from_pretrained(name, n_positions=args.context + max(ts), amp=args.amp,
                                                     kernel_backend="cpu")
            prof = stage_profile(model, stage_s, args.context, ts, args.repeats, args.rounds)
            nbytes = product_bytes(model.config, 2 if args.amp == "bf16" else 4)
            for T, p in prof.items():
                p["products_GBps"] = {s: nbytes[s] / (p["stages_ms"][s] / 1e3) / 1e9 for s in PRODUCTS
                                      if p["stages_ms"][s] > 0}
            rows.append({"model": name, "amp": args.amp, "context": args.context, "product_weight_bytes": nbytes,
                         "by_T": prof})
    finally:
        build._lib = saved
    command = "verispec " + " ".join(getattr(args, "argv", None) or ["bench", "stages"])
    path = write_json("stages", {"command": command, "stages": STAGES, "repeats": args.repeats, "rounds": args.rounds,
                                 "results": rows}, args.out)
    for r in rows:
        table = Table("stage", *[f"T={T} ms" for T in ts], title=f"{r['model']} {r['amp']}, context {r['context']}")
        for s in STAGES:
            cells = []
            for T in ts:
                p = r["by_T"][T]
                gbps = p["products_GBps"].get(s)
                cells.append(f"{p['stages_ms'][s]:.3f}" + (f" ({gbps:.1f} GB/s)" if gbps else ""))
            table.add_row(s, *cells)
        table.add_row("outside the layers", *[f"{r['by_T'][T]['outside_layers_ms']:.3f}" for T in ts])
        table.add_row("forward", *[f"{r['by_T'][T]['forward_ms']:.3f}" for T in ts])
        console.print(table)
    console.print(f"wrote {path}")
    return 0
