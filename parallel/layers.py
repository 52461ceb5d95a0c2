"""Tensor-parallel layers with neuronx-distributed's names and arguments.

Each layer holds only this rank's shard of its weight, with the parameter names of the layer it
replaces (``weight``, ``bias``), and records where that shard sits in the full tensor
(``weight_shard``/``bias_shard`` = (dim, start, stop), or None for a full copy) so a loader reads
just that slice. Build them on the meta device and fill them from a checkpoint
(``verispec.model.loader.materialize`` with the plan's ``shard_fn``), or call
``load_full_weight`` with the unsharded tensors. Weights are stored as in ``nn.Linear``:
``[out_features, in_features]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (
    copy_to_tensor_model_parallel_region,
    even_sizes,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .state import get_tensor_model_parallel_rank, get_tensor_model_parallel_size

Shard = tuple  # (dim, start, stop)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def _new_param(shape: tuple, dtype: torch.dtype, device) -> nn.Parameter:
    # Zeros off the meta device: weights come from a checkpoint or load_full_weight, never
    # from an implicit random init that would differ between ranks.
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type != "meta":
        t.zero_()
    return nn.Parameter(t, requires_grad=False)


class _ShardedModule(nn.Module):
    weight_shard: Shard | None
    bias_shard: Shard | None
    # the local matrix product, (x, weight, bias=None) -> y; a kernel backend's compile may
    # give an instance its own (the cpu backend's few-row native product)
    product = staticmethod(F.linear)

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Fill this rank's shard from the full (unsharded) weight and bias."""
        for name, full, shard in (("weight", weight, self.weight_shard), ("bias", bias, self.bias_shard)):
            param = getattr(self, name, None)
            if param is None:
                if full is not None:
                    raise ValueError(f"{type(self).__name__} has no {name}, but one was given")
                continue
            if full is None:
                raise ValueError(f"{type(self).__name__} needs the full {name}")
            part = full if shard is None else full.narrow(shard[0], shard[1], shard[2] - shard[1])
            if part.shape != param.shape:
                raise ValueError(f"{name}: full tensor {tuple(full.shape)} gives a shard {tuple(part.shape)}, "
                                 f"this rank holds {tuple(param.shape)}")
            setattr(self, name, nn.Parameter(part.to(param.dtype).to(param.device).contiguous(), requires_grad=False))


class ColumnParallelLinear(_ShardedModule):
    """Y = X A^T + b with A split by output rows: rank r computes its slice of Y's last dim.

    gather_output=True all-gathers the slices (every rank gets the full Y); False leaves each
    rank its slice, for a RowParallelLinear(input_is_parallel=True) that follows. By default the
    output features split evenly; ``output_sizes`` allows uneven slices (a vocabulary not divisible
    by the rank count); ``output_range`` = (start, stop) picks an arbitrary, possibly overlapping,
    slice (KV heads replicated over ranks), only with gather_output=False.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        *,
        output_sizes: Sequence[int] | None = None,
        output_range: tuple[int, int] | None = None,
    ):
        super().__init__()
        world, rank = get_tensor_model_parallel_size(), get_tensor_model_parallel_rank()
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        if output_range is not None:
            if gather_output:
                raise ValueError("output_range (a chosen, possibly replicated slice) cannot be combined with gather_output")
            if output_sizes is not None:
                raise ValueError("give output_sizes or output_range, not both")
            start, stop = output_range
            if not 0 <= start < stop <= output_size:
                raise ValueError(f"output_range {output_range} is not inside [0, {output_size})")
            self.output_sizes = None
        else:
            sizes = [divide(output_size, world, "output_size")] * world if output_sizes is None else list(output_sizes)
            if len(sizes) != world or sum(sizes) != output_size or min(sizes) < 0:
                raise ValueError(f"output_sizes {sizes} must give {world} non-negative widths adding up to {output_size}")
            start = sum(sizes[:rank])
            stop = start + sizes[rank]
            self.output_sizes = tuple(sizes)
        self.output_size_per_partition = stop - start
        self.weight = _new_param((stop - start, input_size), dtype, device)  # [out_local, in]
        self.bias = _new_param((stop - start,), dtype, device) if bias else None  # [out_local]
        self.weight_shard = (0, start, stop)
        self.bias_shard = (0, start, stop) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out or out_local]
        y = self.product(copy_to_tensor_model_parallel_region(x), self.weight, self.bias)
        if self.gather_output:
            return gather_from_tensor_model_parallel_region(y, self.output_sizes)
        return y

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, local={self.output_size_per_partition}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(_ShardedModule):
    """Y = X A^T + b with A split by input columns: each rank multiplies its slice of X, then
    the partial products are summed over ranks (all-reduce); the bias is added once, after.

    input_is_parallel=True expects X already split (the output of a ColumnParallelLinear with
    gather_output=False); False splits a full X first.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        world, rank = get_tensor_model_parallel_size(), get_tensor_model_parallel_rank()
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        local = divide(input_size, world, "input_size")
        self.input_size_per_partition = local
        self.weight = _new_param((output_size, local), dtype, device)  # [out, in_local]
        self.bias = _new_param((output_size,), dtype, device) if bias else None  # [out], full on every rank
        self.weight_shard = (1, rank * local, (rank + 1) * local)
        self.bias_shard = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_local or in] -> [..., out]
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = reduce_from_tensor_model_parallel_region(self.product(x, self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, local={self.input_size_per_partition}, output_size={self.output_size}, "
                f"input_is_parallel={self.input_is_parallel}")


class ParallelEmbedding(_ShardedModule):
    """An embedding table split by vocabulary rows (uneven when the vocabulary does not divide).

    Each rank looks up the ids it holds, writes zeros for the others, and an all-reduce sums the
    rows, so every rank gets the full embedding of every id.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        world, rank = get_tensor_model_parallel_size(), get_tensor_model_parallel_rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_sizes = tuple(even_sizes(num_embeddings, world))
        self.vocab_start = sum(self.vocab_sizes[:rank])
        self.vocab_end = self.vocab_start + self.vocab_sizes[rank]
        self.weight = _new_param((self.vocab_sizes[rank], embedding_dim), dtype, device)  # [V_local, E]
        self.bias = None
        self.weight_shard = (0, self.vocab_start, self.vocab_end)
        self.bias_shard = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., E]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"token id out of range: ids span {int(ids.min())}..{int(ids.max())}, vocabulary is {self.num_embeddings}"
            )
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        if self.weight.shape[0] == 0:  # this rank holds no rows (more ranks than rows to share)
            rows = self.weight.new_zeros(*ids.shape, self.embedding_dim)
        else:
            rows = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0)  # [..., E]
        return reduce_from_tensor_model_parallel_region(rows)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}..{self.vocab_end - 1}"
