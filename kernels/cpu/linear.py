"""ctypes wrapper of gemv.c and a Linear that uses it for the skinny products of decode."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("verispec.kernels.cpu")

SOURCE = Path(__file__).with_name("gemv.c")
MAX_M = 16  # rows per native call (gemv.c's MAX_M); more rows are split
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lib = None
_error: str | None = None


def _cache_dir() -> Path:
    home = os.environ.get("VERISPEC_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "verispec")
    return Path(home) / "build"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out = _cache_dir() / f"gemv-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {SOURCE.name} failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
    # torch is imported, so its libgomp.so.1 is loaded and this library shares that OpenMP runtime
    lib = ctypes.CDLL(str(out))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    for name in ("verispec_gemv_bf16", "verispec_gemv_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
        fn.restype = None
    lib.verispec_gemv_isa.restype = ctypes.c_int
    lib.verispec_stream_read.argtypes = [vp, i64, ctypes.c_int]
    lib.verispec_stream_read.restype = ctypes.c_double
    return lib


def _get_lib():
    global _lib, _error
    if _lib is None and _error is None:
        if os.environ.get("VERISPEC_NATIVE", "1") == "0":
            _error = "disabled by VERISPEC_NATIVE=0"
        else:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, failed build: torch's kernels still work
                _error = str(e)
                log.warning("native CPU decode kernels unavailable (%s); using torch's", e)
    return _lib


def available() -> bool:
    return _get_lib() is not None


def build_info() -> dict:
    lib = _get_lib()
    isa = {2: "avx512-bf16", 1: "avx512f", 0: "scalar"}[lib.verispec_gemv_isa()] if lib else None
    return {"available": lib is not None, "isa": isa, "error": _error}


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and weight.is_contiguous()
        and not x.requires_grad
        and not weight.requires_grad
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K] with few rows, via gemv.c when it applies."""
    lib = _get_lib()
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if lib is None or rows == 0 or rows > 4 * MAX_M or not _fits(x, weight, bias):
        return F.linear(x, weight, bias)
    N = weight.shape[0]
    x2 = x.reshape(rows, K).contiguous()  # [M, K]
    y = torch.empty(rows, N, dtype=x.dtype)  # [M, N]
    fn = lib.verispec_gemv_bf16 if x.dtype == torch.bfloat16 else lib.verispec_gemv_f32
    b = bias.contiguous().data_ptr() if bias is not None else None
    nt = torch.get_num_threads()
    for m0 in range(0, rows, MAX_M):
        m = min(MAX_M, rows - m0)
        fn(x2[m0].data_ptr(), weight.data_ptr(), b, y[m0].data_ptr(), m, K, N, nt)
    return y.reshape(*x.shape[:-1], N)


def stream_read(buf: torch.Tensor) -> float:
    """Read every float of ``buf`` (fp32, contiguous, CPU) with the native streaming kernel;
    return their sum. For bandwidth measurement; raises if the native library is unavailable."""
    lib = _get_lib()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_error}")
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError("stream_read needs a contiguous fp32 CPU tensor")
    return lib.verispec_stream_read(buf.data_ptr(), buf.numel(), torch.get_num_threads())


class SkinnyLinear(nn.Linear):
    """An nn.Linear whose few-row products go through gemv.c (larger ones through torch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def use_skinny_linear(module: nn.Module) -> int:
    """Switch every plain nn.Linear in ``module`` to SkinnyLinear in place; return how many.

    Parameters are kept (tied weights stay tied). Subclasses of nn.Linear (e.g. tensor-parallel
    layers) are left alone. A no-op when the native kernels are unavailable.
    """
    if not available():
        return 0
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = SkinnyLinear
            n += 1
    return n
