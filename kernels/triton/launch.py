"""How verispec's Triton kernels are launched: compiled on CUDA tensors, or through Triton's
CPU interpreter on any tensors.

Triton fixes its mode when it is first imported: with ``TRITON_INTERPRET=1`` set at that moment
its own library functions (``tl.sum``, ``tl.max``, ...) are built for the interpreter, otherwise
for the compiler, and a kernel of the other kind cannot call them. So the mode here is the one
Triton was imported in (:func:`interpreting`), not the variable's value now, and the kernels of
this package are built to match it (:func:`kernel`, used instead of ``@triton.jit``), even if
the variable changed between ``import triton`` and the import of this package.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

INTERPRET_ENV = "TRITON_INTERPRET"


def interpreting() -> bool:
    """True when this process imported Triton in interpreter mode (``TRITON_INTERPRET=1``)."""
    return isinstance(tl.sum, InterpretedFunction)


def kernel(fn):
    """Decorator used instead of ``@triton.jit``: builds the kernel for the mode Triton is in."""
    return InterpretedFunction(fn) if interpreting() else JITFunction(fn)


class TritonBackendUnavailable(RuntimeError):
    """The triton backend cannot run on the given tensors (CPU tensors without the interpreter)."""


def check_launchable(what: str, *tensors: torch.Tensor | None) -> bool:
    """Raise a clear error unless ``tensors`` can run here; return True when interpreting.

    All tensors must share one device. In interpreter mode any device works (Triton copies
    through the host); otherwise the tensors must be CUDA tensors.
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = next(iter(devices))
    if interpreting():
        return True
    if device.type != "cuda":
        if os.environ.get(INTERPRET_ENV, "0") not in ("", "0"):
            how = (
                f"{INTERPRET_ENV} is set now, but this process imported triton before it was set, and Triton "
                "fixes its mode at import: set it before the first import of triton (e.g. in the shell)"
            )
        else:
            how = f"set {INTERPRET_ENV}=1 before triton is first imported to run them through Triton's (slow) CPU interpreter"
        raise TritonBackendUnavailable(
            f"{what}: the triton backend runs on CUDA tensors, got tensors on {device}. Use "
            f"kernel_backend='torch' on this device, or {how}."
        )
    return False


# The decoder passes one positions tensor to every layer of a forward. Checking it needs its
# values on the host, and on CUDA that read waits for all queued GPU work; so the host copy of
# the last positions tensor is kept and reused while the same tensor object (and, where torch
# tracks one, the same in-place version) comes back. Only range checks and the load balance of
# verify_attention depend on this copy; the kernels read the positions themselves on the device.
_last_host_positions: tuple = (None, None, None)  # (weakref to the tensor, its version, host copy)


def positions_on_host(positions: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``positions`` [B], fetched once per tensor object (and in-place version)."""
    global _last_host_positions
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape [B], got {type(positions).__name__}")
    if positions.device.type == "cpu":
        return positions
    version = None if positions.is_inference() else positions._version  # inference tensors have none
    ref, last_version, host = _last_host_positions
    if ref is not None and ref() is positions and last_version == version:
        return host
    host = positions.cpu()
    _last_host_positions = (weakref.ref(positions), version, host)
    return host
