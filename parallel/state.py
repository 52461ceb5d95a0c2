"""Tensor-parallel process-group state, named as in neuronx-distributed's ``parallel_state``.

The tensor-parallel group is the whole world: ``tensor_model_parallel_size`` must equal the
number of processes (torchrun's ``--nproc-per-node``); there is no data or pipeline parallelism.
The process group is created from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) with gloo on CPU and NCCL on CUDA, and a timeout on every
collective, so that a rank that dies or stops responding ends the others with an error instead
of a hang. When ``neuronx_distributed`` is importable (and ``VERISPEC_TP_IMPL`` is not
``torch``), its own ``parallel_state`` keeps the group instead.
"""

from __future__ import annotations

import datetime
import importlib
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TensorParallelError(RuntimeError):
    """Tensor parallelism cannot start, or a collective failed (a rank died or hung)."""


class _State:
    size: int | None = None
    group = None
    backend: str | None = None
    timeout_s: float | None = None  # None: the process group was made elsewhere, with its own timeout
    owns_process_group = False
    nxd = None  # neuronx_distributed.parallel_state when that implementation is in use


_state = _State()


def neuronx_distributed_state():
    """neuronx-distributed's ``parallel_state`` module if importable and not opted out, else None."""
    if os.environ.get("VERISPEC_TP_IMPL", "").lower() == "torch":
        return None
    try:
        return importlib.import_module("neuronx_distributed.parallel_state")
    except ImportError:
        return None


def default_timeout_s() -> float:
    raw = os.environ.get("VERISPEC_TP_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"VERISPEC_TP_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"VERISPEC_TP_TIMEOUT_S must be positive, got {raw!r}")
    return value


def default_backend(device: str | torch.device = "cpu") -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    *,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> None:
    """Make every process a member of one tensor-parallel group of ``tensor_model_parallel_size``.

    Starts the torch.distributed process group from torchrun's environment if none exists.
    Calling it again with the same size is a no-op; with another size, an error.
    """
    size = tensor_model_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_model_parallel_size must be a positive integer, got {size!r}")
    if _state.size is not None:
        if _state.size != size:
            raise TensorParallelError(
                f"tensor parallelism is already initialised with size {_state.size}; cannot also use {size} "
                "(models in one process group must share tp_degree, or use tp_degree=1)"
            )
        return
    timeout_s = default_timeout_s() if timeout_s is None else float(timeout_s)
    nxd = neuronx_distributed_state()
    if not dist.is_initialized():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise TensorParallelError(
                f"tp_degree={size} needs {size} processes, but this one was not started by torchrun "
                f"(no torch.distributed process group, and {', '.join(missing)} unset). Start it with "
                f"`torchrun --nproc-per-node {size} your_script.py` (or `verispec generate --tp-degree {size}`, "
                "which does this itself)."
            )
        # checked before joining the group, so no rank leaves while another is still joining
        _check_world(size, int(os.environ["WORLD_SIZE"]))
        backend = backend or default_backend("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _state.owns_process_group = True
    _check_world(size, dist.get_world_size())
    if nxd is not None:
        nxd.initialize_model_parallel(tensor_model_parallel_size=size)
        _state.group = nxd.get_tensor_model_parallel_group()
    else:
        _state.group = dist.group.WORLD
    _state.nxd = nxd
    _state.size = size
    _state.backend = dist.get_backend()
    _state.timeout_s = timeout_s if _state.owns_process_group else None


def _check_world(size: int, world: int) -> None:
    if world != size:
        raise TensorParallelError(
            f"tp_degree={size} does not match the number of processes ({world}): tensor parallelism here spans "
            f"all processes, so tp_degree must be 1 (replicated) or {world} (torchrun --nproc-per-node {size})"
        )


def model_parallel_is_initialized() -> bool:
    return _state.size is not None


def _require() -> None:
    if _state.size is None:
        raise TensorParallelError("tensor parallelism is not initialised: call initialize_model_parallel(n) first")


def get_tensor_model_parallel_size() -> int:
    _require()
    return _state.nxd.get_tensor_model_parallel_size() if _state.nxd else _state.size


def get_tensor_model_parallel_rank() -> int:
    _require()
    return _state.nxd.get_tensor_model_parallel_rank() if _state.nxd else dist.get_rank(_state.group)


def get_tensor_model_parallel_group():
    _require()
    return _state.group


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of the group's rank 0 (the rank whose sampled tokens win)."""
    _require()
    return dist.get_global_rank(_state.group, 0) if _state.group is not dist.group.WORLD else 0


def collective_timeout_s() -> float | None:
    """Seconds a collective waits for the other ranks (None: set by whoever made the process group)."""
    return _state.timeout_s


def destroy_model_parallel() -> None:
    """Forget the tensor-parallel group; also end the process group if this module started it."""
    if _state.nxd is not None:
        _state.nxd.destroy_model_parallel()
    if _state.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _state.size = _state.group = _state.backend = _state.nxd = None
    _state.owns_process_group = False
    _state.timeout_s = None
