"""Shared benchmark helpers: machine description, a memory-bandwidth limit measured in the
same run, timing, and JSON output to bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def results_dir(override: str | None = None) -> Path:
    """bench/results/ of the source checkout (or $VERISPEC_RESULTS / an explicit override)."""
    d = Path(override or os.environ.get("VERISPEC_RESULTS") or Path(__file__).resolve().parent / "results")
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure_memory_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read and copy bandwidth (GB/s) of ``device`` memory, best of ``repeats``.

    read: a sum over a buffer far larger than the caches (bytes read / time); on CPU the
    native streaming-read kernel (as tight as the decode kernels) when it is available, else
    torch.sum; copy: a buffer copy, counting bytes read + written. Weight streaming in decode
    is a read, so ``read_GBps`` is the limit decode speed is compared against.
    """
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    read = a.sum
    if str(device) == "cpu":
        from verispec.kernels import cpu as native

        if native.available():
            read = lambda: native.stream_read(a)  # noqa: E731
    reads, copies = [], []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        read()
        sync()
        reads.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        sync()
        copies.append(2 * nbytes / (time.perf_counter() - t) / 1e9)
    del a, b
    return {"read_GBps": max(reads[1:]), "copy_GBps": max(copies[1:]), "buffer_bytes": nbytes}


def time_fn(fn, warmup: int = 2, repeats: int = 10, device: str = "cpu") -> dict:
    """Wall time of ``fn()`` in seconds: median, min and all samples."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def write_json(name: str, data: dict, out_dir: str | None = None) -> Path:
    path = results_dir(out_dir) / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
