"""Checkpoint loading: tensor sources (HF safetensors here, GGUF in ``gguf_source``) and strict
materialisation of a model built on the meta device.

A source names its tensors in Hugging Face's convention and can load a slice of one along a
dimension, so a tensor-parallel rank reads only its shard (``shard_fn``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

Shard = tuple  # (dim, start, stop)

# Tensors some checkpoints carry that carry no information for us.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, or does not match the config."""


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple: ...

    def load(self, name: str, shard: Shard | None = None) -> torch.Tensor: ...


def _check_safetensors_file(path: Path) -> dict:
    """Parse a safetensors header by hand so truncation is reported with the file's name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


class SafetensorsSource:
    """An HF model directory: ``model.safetensors`` or sharded ``model-*.safetensors`` + index."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"model directory not found: {d}")
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")
        self._handles, self._where = {}, {}
        for fname in files:
            path = d / fname
            if not path.exists():
                raise CheckpointError(f"{path}: shard named in the index is missing")
            _check_safetensors_file(path)
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot open safetensors file ({e})") from None
            self._handles[fname] = h
            for k in h.keys():
                if weight_map is not None and weight_map.get(k) != fname:
                    continue
                self._where[k] = fname
        if weight_map is not None:
            lost = sorted(k for k in weight_map if k not in self._where)
            if lost:
                raise CheckpointError(f"index names tensors absent from their shard: {', '.join(lost[:8])}")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def load(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        sl = self._handles[self._where[name]].get_slice(name)
        if shard is None:
            return sl[:]
        dim, start, stop = shard
        idx = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[idx]


def expected_tensors(model: nn.Module) -> dict[str, tuple]:
    """Names and full shapes of a freshly built (meta) model's parameters; tied ones once."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = tuple(p.shape)
    return out


def check_source(source: TensorSource, expected: dict[str, tuple], tied: bool) -> None:
    """Every expected tensor present with its shape, nothing unexpected: else one error listing all."""
    have = set(source.names())
    allowed_extra = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - have)
    extra = sorted(k for k in have - set(expected) - allowed_extra if not k.endswith(IGNORABLE_SUFFIXES))
    wrong = sorted(
        f"{k}: checkpoint {source.shape(k)} vs config {expected[k]}"
        for k in set(expected) & have
        if tuple(source.shape(k)) != tuple(expected[k])
    )
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if extra:
            parts.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
        if wrong:
            parts.append(f"mis-shaped tensors ({len(wrong)}): " + "; ".join(wrong[:10]))
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(parts))


def materialize(
    model: nn.Module,
    source: TensorSource,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    shard_fn: Callable[[str], Shard | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Replace every (meta) parameter of ``model`` with the source's tensor (or its shard)."""
    params = list(model.named_parameters(remove_duplicate=False))
    loaded: dict[int, nn.Parameter] = {}
    for i, (name, p) in enumerate(params):
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        if id(p) in loaded:  # tied weight: share the tensor loaded the first time
            setattr(module, attr, loaded[id(p)])
            continue
        shard = shard_fn(name) if shard_fn else None
        t = source.load(name, shard)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: loaded shape {tuple(t.shape)} but the model expects {tuple(p.shape)}")
        t = t.to(device=device, dtype=dtype).contiguous()
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()  # a shard that is a view would keep the source's whole tensor alive
        new = nn.Parameter(t, requires_grad=False)
        loaded[id(p)] = new
        setattr(module, attr, new)
        if progress:
            progress(i + 1, len(params))
