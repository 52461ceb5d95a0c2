"""The four mapping functions of Megatron-style tensor parallelism (names from neuronx-distributed).

Each is an autograd function whose backward is the dual collective, so the layers also train;
the engine only runs them forward under ``torch.inference_mode``:

- copy_to:   forward identity,              backward all-reduce
- reduce_from: forward all-reduce (sum),     backward identity
- scatter_to:  forward keep this rank's slice of the last dim, backward all-gather
- gather_from: forward all-gather the last dim,               backward keep this rank's slice

Slices may be uneven (a vocabulary of 97 over 2 ranks): ``sizes`` lists every rank's width.
Every collective goes through ``run_collective``, which turns a failure (a rank that died, or
one that did not answer within the process group's timeout) into a ``TensorParallelError``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .state import (
    TensorParallelError,
    model_parallel_is_initialized,
    collective_timeout_s,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    get_tensor_model_parallel_src_rank,
)

# Partial sums and embedding rows are reduced in fp32: the low-precision sum of partial
# products would round once per rank, where the unsharded matmul rounds once.
_REDUCE_UPCAST = (torch.float16, torch.bfloat16)


def run_collective(what: str, fn: Callable[[], object]):
    """Run one collective; any backend failure becomes a TensorParallelError naming the cause."""
    try:
        return fn()
    except TensorParallelError:
        raise
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        rank = dist.get_rank() if dist.is_initialized() else "?"
        world = dist.get_world_size() if dist.is_initialized() else "?"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        timeout = collective_timeout_s()
        within = "the process group's timeout" if timeout is None else f"{timeout:g} s"
        raise TensorParallelError(
            f"tensor-parallel {what} failed on rank {rank} of {world}: another rank exited or did not answer "
            f"within {within}, so this rank stops too ({first_line})"
        ) from e


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if get_tensor_model_parallel_size() == 1:
        return x
    buf = x.float() if x.dtype in _REDUCE_UPCAST else x.clone()
    run_collective("all-reduce", lambda: dist.all_reduce(buf, group=get_tensor_model_parallel_group()))
    return buf.to(x.dtype)


def even_sizes(total: int, parts: int) -> list[int]:
    """Widths of ``parts`` contiguous slices of ``total``: ceil-sized, the last ones smaller."""
    chunk = -(-total // parts)
    return [max(0, min(chunk, total - r * chunk)) for r in range(parts)]


def _check_sizes(sizes: Sequence[int] | None, total: int | None) -> list[int]:
    world = get_tensor_model_parallel_size()
    if sizes is None:
        if total % world:
            raise ValueError(f"last dimension {total} does not split evenly over {world} tensor-parallel ranks")
        return [total // world] * world
    sizes = list(sizes)
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for {world} tensor-parallel ranks")
    return sizes


def all_gather_last_dim(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim; ``sizes`` allows uneven widths."""
    world = get_tensor_model_parallel_size()
    if world == 1:
        return x
    sizes = _check_sizes(sizes, x.shape[-1] * world)
    rank = get_tensor_model_parallel_rank()
    if x.shape[-1] != sizes[rank]:
        raise ValueError(f"rank {rank} holds width {x.shape[-1]} but sizes says {sizes[rank]}")
    width = max(sizes)
    local = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()  # [..., width]
    parts = [torch.empty_like(local) for _ in range(world)]
    run_collective("all-gather", lambda: dist.all_gather(parts, local, group=get_tensor_model_parallel_group()))
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def split_last_dim(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's slice of the last dim (no communication)."""
    world = get_tensor_model_parallel_size()
    if world == 1:
        return x
    sizes = _check_sizes(sizes, x.shape[-1])
    if sum(sizes) != x.shape[-1]:
        raise ValueError(f"sizes {sizes} do not add up to the last dimension {x.shape[-1]}")
    rank = get_tensor_model_parallel_rank()
    start = sum(sizes[:rank])
    return x[..., start : start + sizes[rank]].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return split_last_dim(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last_dim(grad, ctx.sizes), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return all_gather_last_dim(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        return split_last_dim(grad, ctx.sizes), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    return _ScatterToRegion.apply(x, None if sizes is None else tuple(sizes))


def gather_from_tensor_model_parallel_region(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    return _GatherFromRegion.apply(x, None if sizes is None else tuple(sizes))


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Every rank gets the tensor-parallel rank 0's ``x`` (same shape and dtype on every rank)."""
    if get_tensor_model_parallel_size() == 1:
        return x
    buf = x.clone().contiguous()
    src = get_tensor_model_parallel_src_rank()
    run_collective("broadcast", lambda: dist.broadcast(buf, src=src, group=get_tensor_model_parallel_group()))
    return buf


def broadcast_tokens_if_parallel(tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tokens`` on every rank when a tensor-parallel group is active; else ``tokens``."""
    if not model_parallel_is_initialized() or get_tensor_model_parallel_size() == 1:
        return tokens
    on_gpu = dist.get_backend(get_tensor_model_parallel_group()) == "nccl"  # NCCL moves CUDA tensors only
    comm = tokens.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else tokens
    return broadcast_from_rank0(comm).to(tokens.device)
