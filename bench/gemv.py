"""``verispec bench gemv``: the native CPU products (kernels/cpu/gemv.c) against the memory
bandwidth measured in the same run, per number of activation rows M (1 = a decode step, k = a
k-token verify pass) and weight format (bf16, int8), on a model's real matrix shapes.

Two figures per (format, M):
- streamed: weight bytes / time over matrices far larger than the caches (what decode sees);
  read against the streaming-read bandwidth measured between the repeats;
- cache-resident: the same kernel on a matrix that fits in L2, i.e. its compute ceiling. Where
  the ceiling is below the memory bandwidth, more rows make a pass compute-bound.
"""

from __future__ import annotations

import statistics
import time

# Qwen2.5-1.5B's per-layer products (fused q/k/v, o, fused gate/up, down) and its LM head
QWEN_1_5B_SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (151936, 1536)]


def register(sub) -> None:
    p = sub.add_parser("gemv", help="native CPU products: weight GB/s by rows M and format, against read bandwidth")
    p.add_argument("--ms", default="1,2,4,5,8", help="comma-separated activation rows (1..16)")
    p.add_argument("--formats", default="bf16,int8", help="comma-separated: bf16, f32, int8")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.set_defaults(func=run)


def _product(fmt: str, shapes, gen):
    """(callable(x) -> y, bytes of weights) for one format over matrices of ``shapes``."""
    import torch

    from verispec.kernels.cpu.linear import skinny_linear
    from verispec.kernels.cpu.quant import Int8Linear

    if fmt == "int8":
        mods = [Int8Linear.from_linear(_randn_linear(n, k, gen)) for n, k in shapes]
        nbytes = sum(m.qweight.numel() + 4 * m.scale.numel() for m in mods)
        return (lambda xs: [m(x) for m, x in zip(mods, xs)]), nbytes, torch.bfloat16
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[fmt]
    ws = [torch.randn(n, k, generator=gen).to(dtype) for n, k in shapes]
    return (lambda xs: [skinny_linear(x, w) for w, x in zip(ws, xs)]), sum(w.numel() * w.element_size() for w in ws), dtype


def _randn_linear(n, k, gen):
    import torch

    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
    return lin


def _rate(fn, xs, nbytes: int, inner: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn(xs)
    return nbytes * inner / (time.perf_counter() - t) / 1e9


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from verispec.kernels import cpu as native

    from .common import measure_memory_bandwidth, write_json

    if not native.available():
        raise RuntimeError(f"the native CPU kernels are unavailable: {native.build_info()['error']}")
    ms = [int(m) for m in args.ms.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    if not ms or any(not 1 <= m <= 16 for m in ms):
        raise ValueError(f"--ms must list row counts in 1..16, got {args.ms!r}")
    if not formats or any(f not in ("bf16", "f32", "int8") for f in formats):
        raise ValueError(f"--formats must list bf16, f32 or int8, got {args.formats!r}")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    gen = torch.Generator().manual_seed(0)
    console = Console()
    rows = []
    with torch.inference_mode():
        for fmt in formats:
            big, big_bytes, dtype = _product(fmt, QWEN_1_5B_SHAPES, gen)
            small, small_bytes, _ = _product(fmt, [(256, 1536)], gen)  # 0.4-0.8 MB: L2-resident
            for M in ms:
                xs = [torch.randn(M, k, generator=gen).to(dtype) for _, k in QWEN_1_5B_SHAPES]
                xs_small = [torch.randn(M, 1536, generator=gen).to(dtype)]
                big(xs), small(xs_small)  # warm-up
                streamed, resident, bws = [], [], []
                for _ in range(args.repeats):
                    bws.append(measure_memory_bandwidth("cpu", nbytes=1 << 28, repeats=1)["read_GBps"])
                    streamed.append(_rate(big, xs, big_bytes))
                    resident.append(_rate(small, xs_small, small_bytes, inner=200))
                bw = statistics.median(bws)
                rows.append({"format": fmt, "M": M, "weight_bytes": big_bytes, "streamed_GBps": statistics.median(streamed),
                             "read_bandwidth_GBps": bw, "fraction_of_read_bandwidth": statistics.median(streamed) / bw,
                             "cache_resident_GBps": statistics.median(resident), "streamed_runs": streamed,
                             "bandwidth_runs": bws})
    command = "verispec " + " ".join(getattr(args, "argv", None) or ["bench", "gemv"])
    path = write_json("gemv", {"command": command, "shapes": QWEN_1_5B_SHAPES, "threads": torch.get_num_threads(),
                               "isa": native.build_info()["isa"], "results": rows}, args.out)
    table = Table("format", "M", "streamed GB/s", "read BW GB/s", "% of read BW", "cache-resident GB/s")
    for r in rows:
        table.add_row(r["format"], str(r["M"]), f"{r['streamed_GBps']:.1f}", f"{r['read_bandwidth_GBps']:.1f}",
                      f"{100 * r['fraction_of_read_bandwidth']:.0f}", f"{r['cache_resident_GBps']:.1f}")
    console.print(table)
    console.print("GB/s count weight bytes (int8: 1 byte per weight + a 4-byte scale per row); "
                  "streamed over Qwen2.5-1.5B's matrix shapes, cache-resident over one 256x1536 matrix")
    console.print(f"wrote {path}")
    return 0
