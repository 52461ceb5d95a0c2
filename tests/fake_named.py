"""A tiny registered model for cache tests: a tiny GGUF (tests/tiny_gguf.py) placed in the cache
as a named model's file, with the registry monkeypatched to its size and sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tiny_gguf import write_tiny_gguf

from verispec.model import hub

NAME = "fake-tiny"
FILENAME = "fake-tiny.Q8_0.gguf"
Q8 = ("blk.0.ffn_up.weight", "blk.1.attn_q.weight", "blk.0.attn_k.weight")


def write_gguf(path: Path, hf) -> Path:
    """A llama-arch GGUF of ``hf`` (Q/K rows permuted), some matrices Q8_0, some F16."""
    import numpy as np

    write_tiny_gguf(path, hf, "llama", dtype=np.float16, q8_0=Q8)
    return path


def register(monkeypatch, path: Path) -> hub.NamedModel:
    """Register NAME with the size and sha256 of ``path`` (the file that must sit in the cache)."""
    data = Path(path).read_bytes()
    m = hub.NamedModel(NAME, "tiny test model", FILENAME, (("fake-pkg", "1.0"),), f"fake_pkg/{FILENAME}",
                       len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(hub.REGISTRY, NAME, m)
    return m


def install(home: Path, monkeypatch, hf) -> Path:
    """Write ``hf`` as NAME's cached GGUF under ``home`` and register it; return the file."""
    home.mkdir(parents=True, exist_ok=True)
    path = write_gguf(home / FILENAME, hf)
    register(monkeypatch, path)
    return path


class Counter:
    """Wraps ``obj.attr`` and counts calls."""

    def __init__(self, monkeypatch, obj, attr):
        import threading

        self.n = 0
        lock = threading.Lock()
        orig = getattr(obj, attr)

        def counted(*a, **k):  # (called from several threads by a conversion)
            with lock:
                self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(obj, attr, counted)
