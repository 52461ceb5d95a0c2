"""Backend registry: a backend is a named set of kernels, chosen once per model.

Built-in backends: ``torch`` (reference, always there), ``nki`` and ``triton`` (loaded lazily
on first use). Research users add their own with :func:`register_backend`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from . import reference

log = logging.getLogger("verispec.kernels")

# The kernels of the contract; a backend may also carry extra named kernels (e.g. accept_reject).
CONTRACT = ("verify_attention", "kv_append")

_REFERENCE = {"verify_attention": reference.verify_attention, "kv_append": reference.kv_append}
_backends: dict[str, dict[str, Callable]] = {"torch": dict(_REFERENCE)}
_loaders: dict[str, Callable[[], dict[str, Callable]]] = {}
_warm_ups: dict[str, Callable[[], None]] = {}
_active: list[str] = []  # stack driven by use_backend()
_noticed: set = set()  # (backend, missing kernels) already logged


class BackendUnavailable(RuntimeError):
    """A backend's kernels cannot run on the given tensors here (e.g. triton on CPU tensors
    without its interpreter). Raised by the kernels themselves, with what to do instead."""


class UnknownBackendError(ValueError, KeyError):
    """A backend name nobody registered. A ValueError (a bad input, like any bad name) and, for
    code written against older versions, a KeyError."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class KernelSet:
    """The kernels a model calls, resolved once. ``fallbacks`` names kernels taken from torch."""

    name: str
    verify_attention: Callable
    kv_append: Callable
    extras: dict = field(default_factory=dict)
    fallbacks: tuple = ()

    def get(self, kernel: str) -> Callable | None:
        if kernel in CONTRACT:
            return getattr(self, kernel)
        return self.extras.get(kernel)


def register_backend(name: str, **kernels: Callable) -> None:
    """Register (or replace) backend ``name`` with the given kernels.

    Kernels not given fall back to the torch reference when the backend is resolved.
    """
    if not name or not isinstance(name, str):
        raise ValueError("backend name must be a non-empty string")
    for k, fn in kernels.items():
        if not callable(fn):
            raise TypeError(f"kernel {k!r} of backend {name!r} is not callable")
    _backends[name] = dict(kernels)
    _noticed.difference_update({k for k in _noticed if k[0] == name})


def register_backend_loader(name: str, loader: Callable[[], dict[str, Callable]],
                            warm_up: Callable[[], None] | None = None) -> None:
    """Register a backend whose kernels are imported on first use (keeps heavy imports lazy).
    ``warm_up``: starts slow one-off preparation (e.g. compiling) without waiting for it; called by
    :func:`warm_up_backends`."""
    _loaders[name] = loader
    if warm_up is not None:
        _warm_ups[name] = warm_up


def warm_up_backends() -> None:
    """Let every backend that has one-off preparation start it now, in the background (model
    loading calls this first, so a first compile overlaps fetching and loading weights)."""
    for fn in list(_warm_ups.values()):
        fn()


def _load(name: str) -> dict[str, Callable]:
    if name in _backends:
        return _backends[name]
    check_backend_name(name)
    try:
        kernels = _loaders[name]()
    except ImportError as e:  # a missing package or a failed native build, with its reason
        raise BackendUnavailable(f"kernel backend {name!r} cannot be loaded here: {e}") from e
    _backends[name] = dict(kernels)
    return _backends[name]


def check_backend_name(name: str) -> None:
    """Raise :class:`UnknownBackendError` naming the available backends unless ``name`` is one
    (registered or lazy; nothing is imported)."""
    if name not in _backends and name not in _loaders:
        raise UnknownBackendError(f"unknown kernel backend {name!r}; available: {', '.join(available_backends())}")


def available_backends() -> list[str]:
    """Names of registered backends (lazy ones included; they may still fail to import)."""
    return sorted(set(_backends) | set(_loaders))


def default_backend_name(device: str | None = None) -> str:
    """The backend used when none is named: env ``VERISPEC_KERNELS``, else triton on CUDA, the
    native ``cpu`` backend for a CPU model (when its C kernels built), else torch."""
    env = os.environ.get("VERISPEC_KERNELS")
    if env:
        return env
    if device is not None and str(device).startswith(("cuda", "cpu")):
        name = "triton" if str(device).startswith("cuda") else "cpu"
        try:
            _load(name)
            return name
        except Exception:  # triton missing or broken, no C compiler: the reference still works
            return "torch"
    return "torch"


def get_backend(name: str | None = None, device: str | None = None) -> KernelSet:
    """Resolve a backend once into a :class:`KernelSet` (missing kernels fall back to torch)."""
    if name is None:
        name = _active[-1] if _active else default_backend_name(device)
    kernels = _load(name)
    resolved, fallbacks = {}, []
    for k in CONTRACT:
        if k in kernels:
            resolved[k] = kernels[k]
        else:
            resolved[k] = _REFERENCE[k]
            fallbacks.append(k)
    if fallbacks and (name, tuple(fallbacks)) not in _noticed:  # once per backend, not once per call
        _noticed.add((name, tuple(fallbacks)))
        log.warning("kernel backend %r has no %s; using the torch reference for it", name, ", ".join(fallbacks))
    extras = {k: v for k, v in kernels.items() if k not in CONTRACT}
    return KernelSet(name=name, extras=extras, fallbacks=tuple(fallbacks), **resolved)


@contextlib.contextmanager
def use_backend(name: str):
    """Make ``name`` the backend of the module-level kernels (and of models built inside)."""
    get_backend(name)  # fail early on unknown names
    _active.append(name)
    try:
        yield get_backend(name)
    finally:
        _active.pop()


def verify_attention(q, k_cache, v_cache, positions, scale, active_mask=None):
    """Module-level entry: dispatches to the backend active now (see :func:`use_backend`)."""
    return get_backend().verify_attention(q, k_cache, v_cache, positions, scale, active_mask)


def kv_append(k_cache, v_cache, k_new, v_new, positions):
    """Module-level entry: dispatches to the backend active now (see :func:`use_backend`)."""
    return get_backend().kv_append(k_cache, v_cache, k_new, v_new, positions)
