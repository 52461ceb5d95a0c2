"""Builds the native CPU kernels (gemv.c, w8a8.c, attention.c, layer.c, fused.c, sampling.c) into a shared library on first use.

Compiled with the system C compiler (no torch headers: about a second) into
``$VERISPEC_HOME/build`` (default ~/.cache/verispec/build), keyed by source, flags and CPU,
and loaded with ctypes. Where there is no compiler or the build fails, :func:`available` is
False and callers keep torch's kernels. ``VERISPEC_NATIVE=0`` disables them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch  # noqa: F401  (loads libgomp.so.1 first, so the library shares torch's OpenMP)

log = logging.getLogger("verispec.kernels.cpu")

SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "w8a8.c", "attention.c", "layer.c", "fused.c", "sampling.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("bf16.h", "vmath.h", "steal.h", "step.h")]  # included by the sources: part of the build key
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# extra compiler flags, e.g. VERISPEC_CFLAGS=-DSTAGE_TIMING: fused.c then adds each layer stage's
# seconds into the exported double verispec_stage_s[16] (norm, qkv, rope, attention, transpose, o,
# add+norm, gate/up, silu*up, down, residual add), for profiling by hand
EXTRA_FLAGS = os.environ.get("VERISPEC_CFLAGS", "").split()

_lib = None
_error: str | None = None
_lock = threading.Lock()  # one build at a time (build_in_background's thread and the callers)


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


def _remove_stale_partial_builds(folder: Path, older_than_s: float = 3600.0) -> None:
    """Delete half-written libraries (``tmp*.so``) that a build killed mid-way left behind; a build
    in progress is younger than ``older_than_s``."""
    now = time.time()
    for p in folder.glob("tmp*.so"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                p.unlink()
        except OSError:  # removed by a concurrent builder, or not ours to remove
            pass


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    flags = FLAGS + EXTRA_FLAGS
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out = _cache_dir() / f"native-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partial_builds(out.parent)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        t0 = time.perf_counter()
        res = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True)
        log.info("timing: native CPU kernels compiled %.2f s", time.perf_counter() - t0)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling the native CPU kernels failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
    # torch is imported, so its libgomp.so.1 is loaded and this library shares that OpenMP runtime
    lib = ctypes.CDLL(str(out))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    for name in ("verispec_gemv_bf16", "verispec_gemv_bf16_f32out", "verispec_gemv_bf16_tiles",
                 "verispec_gemv_bf16_tiles_f32out", "verispec_gemv_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
        fn.restype = None
    lib.verispec_gemv_i8.argtypes = [vp, ctypes.c_int, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
    lib.verispec_gemv_i8.restype = ctypes.c_int
    lib.verispec_gemv_w8a8.argtypes = [vp, ctypes.c_int, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
    lib.verispec_gemv_w8a8.restype = ctypes.c_int
    lib.verispec_w8a8_available.restype = ctypes.c_int
    from .abi import bind_step

    bind_step(lib)  # verispec_step's typed arguments, checked against the library's own layout table
    lib.verispec_attention.argtypes = [vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                       ctypes.c_int, ctypes.c_int]
    lib.verispec_attention.restype = ctypes.c_int
    lib.verispec_rms_norm.argtypes = [vp, vp, vp, vp, vp, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.verispec_rms_norm.restype = None
    lib.verispec_rope_append.argtypes = [vp, i64, vp, vp, i64, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, i64,
                                         ctypes.c_int]
    lib.verispec_rope_append.restype = None
    lib.verispec_silu_mul.argtypes = [vp, vp, i64, vp, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.verispec_silu_mul.restype = None
    lib.verispec_argmax.argtypes = [vp, i64, i64, ctypes.c_int, vp, ctypes.c_int]
    lib.verispec_argmax.restype = i64
    lib.verispec_softmax_at.argtypes = [vp, i64, i64, ctypes.c_int, vp, vp]
    lib.verispec_softmax_at.restype = i64
    lib.verispec_gemv_isa.restype = ctypes.c_int
    lib.verispec_gemv_tiles_available.restype = ctypes.c_int
    lib.verispec_stream_read.argtypes = [vp, i64, ctypes.c_int]
    lib.verispec_stream_read.restype = ctypes.c_double
    return lib


def get_lib():
    if _lib is not None or _error is not None:  # the hot path: no lock
        return _lib
    with _lock:
        return _get_lib()


def build_in_background() -> None:
    """Start compiling (or loading) the library on a thread, so that a first build overlaps other
    work such as a model's first load; :func:`get_lib` waits for it."""
    if _lib is None and _error is None:
        threading.Thread(target=get_lib, name="verispec-native-build", daemon=True).start()


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
    return get_lib() is not None


def build_info() -> dict:
    lib = get_lib()
    isa = {2: "avx512-bf16", 1: "avx512f", 0: "scalar"}[lib.verispec_gemv_isa()] if lib else None
    return {"available": lib is not None, "isa": isa, "amx": tiles_available(), "error": _error}


def tiles_available() -> bool:
    """Whether bf16 products can run on AMX tiles here (``amx=True`` models): the library was built
    for AMX-BF16 and Linux granted this process the tile state."""
    lib = get_lib()
    return bool(lib is not None and lib.verispec_gemv_tiles_available())


def build_error() -> str | None:
    return _error
