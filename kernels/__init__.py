"""Kernel contract, backend registry and torch reference twins.

    kv_append(k_cache, v_cache, k_new, v_new, positions)            -> None (in place)
    verify_attention(q, k_cache, v_cache, positions, scale, active_mask=None) -> out

See ``reference.py`` for the exact semantics and shapes. A model resolves its backend once
(``kernel_backend=`` of ``from_pretrained`` or env ``VERISPEC_KERNELS``); the module-level
functions here dispatch to the backend made active by :func:`use_backend` (default torch).
"""

from . import reference
from .registry import (
    CONTRACT,
    BackendUnavailable,
    KernelSet,
    UnknownBackendError,
    available_backends,
    check_backend_name,
    default_backend_name,
    get_backend,
    kv_append,
    register_backend,
    register_backend_loader,
    use_backend,
    verify_attention,
    warm_up_backends,
)


def _load_nki() -> dict:
    from .nki.backend import kernels

    return kernels()


register_backend_loader("nki", _load_nki)  # imported on first use: the interpreter stays unloaded until then

__all__ = [
    "BackendUnavailable",
    "CONTRACT",
    "KernelSet",
    "UnknownBackendError",
    "available_backends",
    "check_backend_name",
    "default_backend_name",
    "get_backend",
    "kv_append",
    "reference",
    "register_backend",
    "register_backend_loader",
    "use_backend",
    "verify_attention",
    "warm_up_backends",
]


def _load_triton_backend() -> dict:
    from .triton import KERNELS  # ImportError, with its reason, when triton is missing

    return KERNELS


register_backend_loader("triton", _load_triton_backend)


def _load_cpu_backend() -> dict:
    from .cpu.attention import load  # ImportError, with its reason, when the native build failed

    return load()


def _warm_up_cpu_backend() -> None:
    from .cpu.build import build_in_background

    build_in_background()


register_backend_loader("cpu", _load_cpu_backend, warm_up=_warm_up_cpu_backend)
