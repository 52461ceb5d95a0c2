"""Named models' dequantized weights, kept in the cache as safetensors: only the first load of a
named model (per dtype) dequantizes its GGUF; later loads read the weights back in seconds.

Layout, beside the GGUF files in ``$VERISPEC_HOME`` (default ``~/.cache/verispec``)::

    <name>/<dtype>.safetensors   HF tensor names and layout (Q/K rows unpermuted), in <dtype>;
                                 header __metadata__: verispec_format, source, source_sha256
    <name>/<dtype>.json          {"format", "source", "source_sha256", "dtype", "size", "mtime_ns"}

The record ties the file to the verified sha256 of its GGUF, to this module's ``FORMAT`` and to
the file's own size and mtime. Any difference (another GGUF, a new format, a truncated or touched
file, no record) or a file that does not parse makes the load rebuild it. A build runs under a
lock and writes the file under a temporary name, renamed when complete, then the record: a killed
build leaves nothing that loads. A build that cannot write (disk full) falls back to loading
from the GGUF. ``VERISPEC_CONVERTED_CACHE=0`` turns the cache off.

Tensors are read with plain reads into tensors of their own (no memory map), so the process
holds the weights once. A build dequantizes on one thread per core (at most 4) and holds only the few
tensors in flight.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from . import hub
from .loader import CheckpointError, Shard, _check_safetensors_file

log = logging.getLogger("verispec.model")

FORMAT = 1  # bump when what is stored changes (names, layout, dtype rules): old files are rebuilt
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def enabled() -> bool:
    return os.environ.get("VERISPEC_CONVERTED_CACHE", "1") != "0"


def paths(name: str, dtype: torch.dtype) -> tuple[Path, Path]:
    """(safetensors file, record) of ``name``'s weights in ``dtype``."""
    d = hub.cache_dir() / name
    return d / f"{DTYPE_NAMES[dtype]}.safetensors", d / f"{DTYPE_NAMES[dtype]}.json"


class ConvertedSource:
    """A TensorSource over one converted file, checked against the source's sha256."""

    def __init__(self, path: Path, source_sha256: str):
        self.path = Path(path)
        self._entries = {}
        try:
            header = dict(_check_safetensors_file(self.path))  # truncated, corrupt header: CheckpointError
            with open(self.path, "rb") as f:
                self._data = 8 + int.from_bytes(f.read(8), "little")
            meta = header.pop("__metadata__", None) or {}
            if meta.get("verispec_format") != str(FORMAT) or meta.get("source_sha256") != source_sha256:
                raise CheckpointError(f"{self.path}: converted from another source or format ({meta})")
            for name, e in header.items():
                dtype, shape, (a, b) = _ST_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                if b - a != torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size():
                    raise ValueError(f"{name}: {b - a} bytes for shape {shape}")
                self._entries[name] = (dtype, shape, self._data + a)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e!r})") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def load(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        dtype, shape, offset = self._entries[name]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(offset)
                done = 0
                while done < len(buf):
                    n = f.readinto(buf[done:])
                    if not n:
                        raise CheckpointError(f"{self.path}: truncated: tensor {name} ends past the end of the file")
                    done += n
        if shard is not None:
            dim, start, stop = shard
            t = t.narrow(dim, start, stop - start).contiguous()
        return t


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Dequantizing leaves
    many freed blocks of a few MB in the heap, which otherwise stay in the process's resident
    memory (over a GB after converting a 1.5B model); elsewhere a no-op."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def weights_source(source, path: Path, dtype: torch.dtype, progress: bool = False):
    """Where a load in ``dtype`` reads its weights: for a named model's GGUF, its converted
    weights in the cache (built on the first load); another GGUF file is dequantized straight
    into ``dtype``; other sources are returned as they are."""
    from .gguf_source import GGUFSource

    if not isinstance(source, GGUFSource):
        return source
    source.dtype = dtype
    name = hub.registered_name(path)
    if name is None or dtype not in DTYPE_NAMES or not enabled():
        return source
    return open_converted(name, source, dtype, progress=progress)


def _record_matches(st: Path, rec: Path, sha: str, dtype: torch.dtype) -> bool:
    r = hub.read_json(rec)
    try:
        s = st.stat()
    except OSError:
        return False
    return bool(r) and r.get("format") == FORMAT and r.get("source_sha256") == sha and \
        r.get("dtype") == DTYPE_NAMES[dtype] and r.get("size") == s.st_size and r.get("mtime_ns") == s.st_mtime_ns


def _open_valid(st: Path, rec: Path, sha: str, dtype: torch.dtype) -> ConvertedSource | None:
    if not _record_matches(st, rec, sha, dtype):
        return None
    try:
        return ConvertedSource(st, sha)
    except CheckpointError as e:
        log.warning("rebuilding the converted weights: %s", e)
        return None


def open_converted(name: str, source, dtype: torch.dtype, progress: bool = False):
    """A source over ``name``'s weights in ``dtype`` from the cache, converted from ``source`` (the
    model's verified GGUFSource) first when needed; ``source`` itself if the cache cannot be written."""
    sha = hub.get(name).sha256  # the caller verified the GGUF (hub.verify) against this
    st, rec = paths(name, dtype)
    found = _open_valid(st, rec, sha, dtype)
    if found is not None:
        return found
    try:
        st.parent.mkdir(parents=True, exist_ok=True)
        with hub.locked(st.parent / ".lock"):
            found = _open_valid(st, rec, sha, dtype)  # another process may have built it meanwhile
            if found is not None:
                return found
            rec.unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                _build(name, source, dtype, st, sha, progress)
            finally:
                release_freed_memory()
            s = st.stat()
            hub.write_json_atomic(rec, {"format": FORMAT, "source": source.path.name, "source_sha256": sha,
                                        "dtype": DTYPE_NAMES[dtype], "size": s.st_size, "mtime_ns": s.st_mtime_ns})
            hub.phase(f"dequantize+write {name} ({DTYPE_NAMES[dtype]})", time.perf_counter() - t0)
            return ConvertedSource(st, sha)
    except OSError as e:  # a full disk, a read-only cache: load from the GGUF file itself
        log.warning("cannot keep %s's converted weights in %s (%s); loading from the GGUF file", name, st.parent, e)
        return source


def _build(name: str, source, dtype: torch.dtype, st: Path, sha: str, progress: bool) -> None:
    """Write the converted file: the header first (every shape is known), then one tensor at a
    time, under a temporary name renamed to ``st`` once complete."""
    from .convert import _Bar

    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for n in source.names():
        shape = [int(d) for d in source.shape(n)]
        size = torch.Size(shape).numel() * item
        header[n] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "verispec_format": str(FORMAT), "source": source.path.name,
                              "source_sha256": sha}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    tmp = st.with_name(f".{st.name}.partial")
    bar = _Bar(progress, f"converting {name} to {DTYPE_NAMES[dtype]} (first load only)", len(header) - 1)
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for n, t in _loaded_in_order(source, dtype):
                if list(t.shape) != header[n]["shape"] or t.dtype != dtype:
                    raise CheckpointError(f"{source.path}: {n} loads as {tuple(t.shape)} {t.dtype}, not {header[n]}")
                if t.numel():
                    f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
                bar.advance()
        os.replace(tmp, st)
    finally:
        tmp.unlink(missing_ok=True)
        bar.close()


def _loaded_in_order(source, dtype: torch.dtype):
    """(name, tensor) in the source's order, dequantized by ``VERISPEC_CONVERT_JOBS`` threads
    (default: one per core, at most 4; numpy lets go of the GIL) with at most that many tensors ahead."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    jobs = hub.env_int("VERISPEC_CONVERT_JOBS", min(4, os.cpu_count() or 1))
    names = iter(source.names())
    with ThreadPoolExecutor(jobs) as pool:
        ahead = deque()
        try:
            for n in names:
                ahead.append((n, pool.submit(source.load, n, dtype=dtype)))
                if len(ahead) >= jobs:
                    n, fut = ahead.popleft()
                    yield n, fut.result()
            while ahead:
                n, fut = ahead.popleft()
                yield n, fut.result()
        finally:
            for _, fut in ahead:
                fut.cancel()
