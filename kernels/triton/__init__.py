"""CUDA kernels in Triton: the ``triton`` kernel backend.

    verify_attention  flash-decoding attention for verify passes (T = 1..16; any T is correct)
    kv_append         scatter of T new K/V rows per batch row
    kv_gather         move a token tree's accepted K/V rows to contiguous slots
    accept_reject     the exact accept/reject step, twin of ``verispec.spec.rejection.rejection_sample``

The backend is chosen automatically for models on CUDA when triton imports (override with
``kernel_backend=``). On CUDA tensors the kernels run compiled; with ``TRITON_INTERPRET=1`` they
run on any tensors through Triton's CPU interpreter (slow; used by the tests). On CPU tensors
without it they raise :class:`TritonBackendUnavailable`.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # the registry reports this when the backend is asked for
    raise ImportError(
        "the 'triton' kernel backend needs the triton package (pip install 'verispec[cuda]'); "
        f"importing it failed: {e}"
    ) from e

from .rejection import accept_reject
from .attention import verify_attention
from .append import kv_append
from .gather import kv_gather
from .launch import TritonBackendUnavailable, interpreting

KERNELS = {"verify_attention": verify_attention, "kv_append": kv_append, "kv_gather": kv_gather,
           "accept_reject": accept_reject}

__all__ = ["KERNELS", "TritonBackendUnavailable", "accept_reject", "interpreting", "kv_append", "kv_gather",
           "verify_attention"]
