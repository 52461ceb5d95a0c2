"""``verispec bench gemv``: the native CPU products (kernels/cpu/gemv.c) against the memory
bandwidth measured in the same run, per number of activation rows M (1 = a decode step, k = a
k-token verify pass) and weight format (bf16, int8, w8a8; bf16-amx: the bf16 products on AMX tiles
of ``amx=True`` models), on a model's real matrix shapes.

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
    p.add_argument("--formats", default="bf16,int8,w8a8",
                   help="comma-separated: bf16, bf16-amx (AMX tiles), f32, int8, w8a8")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    p.add_argument("--out", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


def _product(fmt: str, shapes, M: int, gen):
    """(callable() running gemv.c once over matrices of ``shapes`` with M activation rows, weight
    bytes): direct library calls on preallocated tensors, so the figure is the kernel's own."""
    import torch

    from verispec.kernels.cpu.build import get_lib
    from verispec.kernels.cpu.quant import quantize_rows

    lib, nt = get_lib(), torch.get_num_threads()
    calls, nbytes = [], 0
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen)
        if fmt in ("int8", "w8a8"):
            q, scale = quantize_rows(w)
            x = torch.randn(M, k, generator=gen).to(torch.bfloat16)
            y = torch.empty(M, n, dtype=torch.bfloat16)
            args = (x.data_ptr(), 1, q.data_ptr(), scale.data_ptr(), None, y.data_ptr(), M, k, n, nt)
            fn = lib.verispec_gemv_i8 if fmt == "int8" else lib.verispec_gemv_w8a8
            calls.append((fn, args, (q, scale, x, y)))
            nbytes += q.numel() + 4 * scale.numel()
        else:
            dtype = torch.float32 if fmt == "f32" else torch.bfloat16
            w = w.to(dtype)
            x = torch.randn(M, k, generator=gen).to(dtype)
            y = torch.empty(M, n, dtype=dtype)
            fn = {"bf16": lib.verispec_gemv_bf16, "bf16-amx": lib.verispec_gemv_bf16_tiles, "f32": lib.verispec_gemv_f32}[fmt]
            calls.append((fn, (x.data_ptr(), w.data_ptr(), None, y.data_ptr(), M, k, n, nt), (w, x, y)))
            nbytes += w.numel() * w.element_size()

    def run_all():
        for fn, args, _keep in calls:  # _keep holds the tensors behind the pointers
            fn(*args)

    return run_all, nbytes


def _resident_shape(fmt: str) -> tuple[int, int]:
    """A [N, 1536] matrix of about 1.5 MB: each thread's half stays in its core's 1 MB L2."""
    per_row = 1536 * {"bf16": 2, "bf16-amx": 2, "f32": 4, "int8": 1, "w8a8": 1}[fmt]
    return (1536 * 1024) // per_row, 1536


def _rate(fn, nbytes: int, inner: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return nbytes * inner / (time.perf_counter() - t) / 1e9


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from verispec.kernels import cpu as native
    from verispec.kernels.cpu.build import get_lib, tiles_available

    from .common import machine_info, measure_memory_bandwidth, write_json

    if not native.available():
        raise RuntimeError(f"the native CPU kernels are unavailable: {native.build_info()['error']}")
    ms = [int(m) for m in args.ms.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    if not ms or any(not 1 <= m <= 16 for m in ms):
        raise ValueError(f"--ms must list row counts in 1..16, got {args.ms!r}")
    if not formats or any(f not in ("bf16", "bf16-amx", "f32", "int8", "w8a8") for f in formats):
        raise ValueError(f"--formats must list bf16, bf16-amx, f32, int8 or w8a8, got {args.formats!r}")
    if "bf16-amx" in formats and not tiles_available():
        raise RuntimeError("--formats bf16-amx needs AMX-BF16 tiles, which this CPU (or kernel) does not grant")
    if "w8a8" in formats and not get_lib().verispec_w8a8_available():
        raise RuntimeError("--formats w8a8 needs AVX512-VNNI, which this build of the native kernels lacks")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    gen = torch.Generator().manual_seed(0)
    console = Console()
    rows = []
    for fmt in formats:
        for M in ms:
            big, big_bytes = _product(fmt, QWEN_1_5B_SHAPES, M, gen)
            small, small_bytes = _product(fmt, [_resident_shape(fmt)], M, gen)
            big(), small()  # warm-up
            streamed, resident, bws = [], [], []
            for _ in range(args.repeats):
                bws.append(measure_memory_bandwidth("cpu", nbytes=1 << 28, repeats=1)["read_GBps"])
                streamed.append(_rate(big, big_bytes))
                resident.append(_rate(small, small_bytes, inner=100))
            del big, small
            bw = statistics.median(bws)
            rows.append({"format": fmt, "M": M, "weight_bytes": big_bytes, "streamed_GBps": statistics.median(streamed),
                         "read_bandwidth_GBps": bw, "fraction_of_read_bandwidth": statistics.median(streamed) / bw,
                         "cache_resident_GBps": statistics.median(resident), "streamed_runs": streamed,
                         "bandwidth_runs": bws})
    command = "verispec " + " ".join(getattr(args, "argv", None) or ["bench", "gemv"])
    path = write_json("gemv", {"command": command, "shapes": QWEN_1_5B_SHAPES, "threads": torch.get_num_threads(),
                               "isa": native.build_info()["isa"], "amx": tiles_available(),
                               "machine": machine_info(), "results": rows}, args.out)
    table = Table("format", "M", "streamed GB/s", "read BW GB/s", "% of read BW", "cache-resident GB/s")
    for r in rows:
        table.add_row(r["format"], str(r["M"]), f"{r['streamed_GBps']:.1f}", f"{r['read_bandwidth_GBps']:.1f}",
                      f"{100 * r['fraction_of_read_bandwidth']:.0f}", f"{r['cache_resident_GBps']:.1f}")
    console.print(table)
    console.print("GB/s count weight bytes (int8, w8a8: 1 byte per weight + a 4-byte scale per row); streamed over "
                  "Qwen2.5-1.5B's matrix shapes, cache-resident over one ~1.5 MB [N, 1536] matrix; bf16 activations")
    console.print(f"wrote {path}")
    return 0
