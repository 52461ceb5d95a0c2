"""A fast reader for the GGUF container: metadata and the tensor directory (type, shape, byte
offset and size of each tensor) from a memory map.

``gguf.GGUFReader`` builds one numpy object per metadata array element, which takes ~10 s for a
151k-token vocabulary; this reader parses the same layout directly (numeric arrays with
``np.frombuffer``, string arrays in one pass) and checks every bound, so a truncated or corrupt
file fails with the file's name and the offset where it broke. Dequantization stays with
``gguf.quants``.

Layout (little-endian, versions 2 and 3): ``b"GGUF"``, u32 version, u64 tensor count, u64 kv
count; kv pairs (string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 dims
fastest-axis first, u32 ggml type, u64 offset); padding to ``general.alignment`` (default 32);
tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loader import CheckpointError

# GGUF metadata value types
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple  # GGUF order: fastest axis first (the reverse of torch's shape)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple:
        return tuple(reversed(self.dims))


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: corrupt or truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {len(self.buf)}"
            )

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} is not UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype == _STRING:
                return self._string_array(count, what)
            if etype == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(count)]
            if etype not in _SCALAR:
                raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown element type {etype}")
            dt = np.dtype(_SCALAR[etype])
            self.need(count * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
        if vtype not in _SCALAR:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown value type {vtype}")
        return self.scalar(_STRUCT[vtype], what)

    def _string_array(self, count: int, what: str) -> list[str]:
        out, buf, pos, end = [], self.buf, self.pos, len(self.buf)
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.need(n, what)
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors="strict"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: Path, buf) -> tuple[dict, list[TensorInfo]]:
    """Parse metadata and the tensor directory of the GGUF bytes ``buf`` (a memory map)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes)")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    if n_tensors > len(buf) or n_kv > len(buf):  # each entry takes bytes: a garbage count
        raise CheckpointError(f"{path}: corrupt GGUF header (claims {n_tensors} tensors, {n_kv} metadata entries)")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar("<I", f"type of {key!r}")
        try:
            metadata[key] = cur.value(vtype, f"metadata {key!r}")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: corrupt GGUF file: metadata {key!r} holds invalid UTF-8") from None
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", f"rank of {name}")
        if n_dims > 8:
            raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name} claims {n_dims} dimensions")
        dims = tuple(cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims))
        ggml_type = cur.scalar("<I", f"type of {name}")
        offset = cur.scalar("<Q", f"offset of {name}")
        infos.append((name, dims, ggml_type, offset))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path}: corrupt GGUF file: alignment {align!r} is not a power of two")
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, ggml_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name}: row of {dims[0]} is not a multiple of {qtype.name}'s block {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor {name} needs bytes up to {start + nbytes}, the file has {len(buf)}"
            )
        tensors.append(TensorInfo(name, dims, int(qtype), start, nbytes))
    return metadata, tensors

