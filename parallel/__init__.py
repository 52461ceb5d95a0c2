"""Tensor parallelism on torch.distributed, with neuronx-distributed's names.

- process-group state: ``initialize_model_parallel``, ``get_tensor_model_parallel_rank/size/group``,
  ``destroy_model_parallel`` (``state``);
- layers: ``ColumnParallelLinear``, ``RowParallelLinear``, ``ParallelEmbedding`` (``layers``);
- the mapping functions to and from the tensor-parallel region (``mappings``);
- the plan that shards a built Llama-family decoder (``plan.apply_tensor_parallel``);
- process start-up helpers (``launch``: torchrun relaunch, ``run_ranks``).

``LlamaForSampling.from_pretrained(..., tp_degree=N)`` applies the plan inside a torchrun job.
"""

from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .state import (
    TensorParallelError,
    destroy_model_parallel,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
    neuronx_distributed_state,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "TensorParallelError",
    "copy_to_tensor_model_parallel_region",
    "destroy_model_parallel",
    "gather_from_tensor_model_parallel_region",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_size",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "neuronx_distributed_state",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
]
