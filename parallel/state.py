"""Tensor-parallel process-group state, named as in neuronx-distributed's ``parallel_state``.

The tensor-parallel group is the whole world: ``tensor_model_parallel_size`` must equal the
number of processes (torchrun's ``--nproc-per-node``); there is no data or pipeline parallelism.
The process group is created from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) with gloo on CPU and NCCL on CUDA, and a timeout on every
collective, so that a rank that dies or stops responding ends the others with an error instead
of a hang. When ``neuronx_distributed`` is importable (and ``VERISPEC_TP_IMPL`` is not
``torch``), its own ``parallel_state`` keeps the group instead.

A process group this module starts is also ended by it at exit (an ``atexit`` hook), so a script
that never calls ``destroy_model_parallel`` still exits cleanly. Without that, gloo's worker
thread can drop its last finished work (which holds a tensor whose Python object it must release,
so it needs the GIL) after the interpreter has begun finalizing; Python then ends that thread
inside a C++ destructor and the process aborts ("terminate called without an active exception",
SIGABRT). Ending the group in ``atexit`` joins those threads while the interpreter is still whole.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
EXIT_BARRIER_TIMEOUT_S = 10.0  # at most this long (or the collective timeout) for the other ranks at exit
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TensorParallelError(RuntimeError):
    """Tensor parallelism cannot start, or a collective failed (a rank died or hung)."""


class _State:
    size: int | None = None
    group = None
    backend: str | None = None
    timeout_s: float | None = None  # None: the process group was made elsewhere, with its own timeout
    owns_process_group = False
    process_group = None  # the default process group this module started (to end only that one)
    exit_hook_pid: int | None = None  # the process that registered the exit hook
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
        _state.process_group = dist.group.WORLD
        _register_exit_hook()
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


def _owned_group_is_live() -> bool:
    """This module started the process group, and it is still the current one (not ended, nor
    replaced by the user's own)."""
    return _state.owns_process_group and dist.is_initialized() and dist.group.WORLD is _state.process_group


def destroy_model_parallel() -> None:
    """Forget the tensor-parallel group; also end the process group if this module started it.

    Safe to call more than once, and after the user has ended the process group themselves.
    """
    if _state.nxd is not None:
        _state.nxd.destroy_model_parallel()
    if _owned_group_is_live():
        dist.destroy_process_group()
    _state.size = _state.group = _state.backend = _state.nxd = _state.process_group = None
    _state.owns_process_group = False
    _state.timeout_s = None


def _register_exit_hook() -> None:
    if _state.exit_hook_pid != os.getpid():
        atexit.register(_end_process_group_at_exit)
        _state.exit_hook_pid = os.getpid()


def _exiting_on_uncaught_exception() -> bool:
    # set by the interpreter when it prints the uncaught exception that ends the script
    return hasattr(sys, "last_exc") or hasattr(sys, "last_value")


def _end_process_group_at_exit() -> None:
    """atexit: end the process group this module started, if the user has not, before the
    interpreter finalizes. On a normal exit, first wait (at most EXIT_BARRIER_TIMEOUT_S) until every
    rank has reached its exit, so that no rank closes its connections while another is still
    reading its last collective's messages. After an uncaught exception, skip that wait: the others
    may be blocked in a collective this rank will never join, and ending the group now tells them
    at once."""
    if _state.exit_hook_pid != os.getpid() or not _state.owns_process_group:
        return  # a forked child (the group's threads are the parent's), or the user ended the group
    try:
        if _owned_group_is_live() and dist.get_world_size() > 1 and not _exiting_on_uncaught_exception():
            _wait_for_all_ranks_at_exit(min(EXIT_BARRIER_TIMEOUT_S, _state.timeout_s or EXIT_BARRIER_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - a rank that is gone or late: end this rank's group anyway
        pass
    try:
        destroy_model_parallel()  # ends the process group only if it is still the one started here
    except Exception as e:  # noqa: BLE001 - exiting: report, never raise from atexit
        print(f"verispec: could not end the tensor-parallel process group at exit: {type(e).__name__}: {e}",
              file=sys.stderr)


def _wait_for_all_ranks_at_exit(timeout_s: float) -> None:
    """A barrier on the process group's key-value store, not a collective: its timeout holds even
    when another rank is stuck in a collective (gloo's own barriers then wait for the whole
    collective timeout), and it sends nothing over the connections about to close."""
    store = dist.distributed_c10d._get_default_store()
    key = "verispec/exit"
    if store.add(key, 1) == dist.get_world_size():  # the last rank to arrive lets everyone go
        store.set(key + "/all", "1")
    store.wait([key + "/all"], datetime.timedelta(seconds=timeout_s))
