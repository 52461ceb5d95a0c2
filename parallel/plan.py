"""The tensor-parallel plan for the Llama-family ``Decoder``: which Linear becomes column- or
row-parallel, applied to a built model so ``verispec.model`` stays free of distributed code.

Per decoder layer (Megatron's split, one all-reduce after attention and one after the MLP):
  q_proj  column-parallel by query heads       k_proj/v_proj  column-parallel by KV heads
  o_proj  row-parallel (input is parallel)     gate/up_proj   column-parallel, down_proj row-parallel
and a vocabulary-parallel embedding and LM head (the logits are all-gathered). Tied embeddings
share one shard. When tp_degree > num_key_value_heads, each KV head is replicated on the
tp_degree / num_key_value_heads ranks whose query heads use it.

Built on the meta device (as ``LlamaForSampling.from_pretrained`` does), the plan returns a
``shard_fn(name) -> (dim, start, stop) | None`` that the loader uses to read only this rank's
slice of each tensor. Applied to a decoder that already holds weights, it slices them in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .mappings import broadcast_from_rank0
from .state import (
    default_backend,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
)


@dataclass(frozen=True)
class TensorParallelState:
    """What a tensor-parallel ``LlamaForSampling`` keeps as ``model.tp``."""

    tp_degree: int
    rank: int
    device: torch.device  # this rank's device (cuda:LOCAL_RANK under NCCL)
    heads: tuple[int, int]  # [start, stop) of the query heads on this rank
    kv_heads: tuple[int, int]  # [start, stop) of the KV heads on this rank
    kv_replicated: bool  # tp_degree > num_key_value_heads: a KV head lives on several ranks

    def broadcast_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every rank gets rank 0's ``tokens`` (any integer tensor of the same shape on all ranks)."""
        comm = tokens.to(self.device) if self.device.type == "cuda" else tokens
        return broadcast_from_rank0(comm).to(tokens.device)


def check_tp_degree(config, tp_degree: int) -> None:
    """Errors for a tp_degree this model cannot be split by (checked before any process starts talking)."""
    if isinstance(tp_degree, bool) or not isinstance(tp_degree, int) or tp_degree < 1:
        raise ValueError(f"tp_degree must be a positive integer, got {tp_degree!r}")
    H, H_kv, F_ = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if H % tp_degree:
        raise ValueError(f"tp_degree={tp_degree} does not divide num_attention_heads={H}; "
                         f"use one of {[d for d in range(1, H + 1) if H % d == 0]}")
    if H_kv % tp_degree and tp_degree % H_kv:
        raise ValueError(
            f"tp_degree={tp_degree} and num_key_value_heads={H_kv}: one must divide the other (KV heads are either "
            "split over ranks or each replicated on a whole number of ranks)"
        )
    if F_ % tp_degree:
        raise ValueError(f"tp_degree={tp_degree} does not divide intermediate_size={F_}")


def head_ranges(config, tp_degree: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """([q_start, q_stop), [kv_start, kv_stop)) held by ``rank``: the KV heads its query heads use."""
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    per_rank = H // tp_degree
    group = H // H_kv  # query heads per KV head
    q0, q1 = rank * per_rank, (rank + 1) * per_rank
    return (q0, q1), (q0 // group, (q1 - 1) // group + 1)


def rank_device(device: str | torch.device) -> torch.device:
    """A CUDA device without an index becomes cuda:LOCAL_RANK (one GPU per rank)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def apply_tensor_parallel(
    decoder: nn.Module,
    tp_degree: int,
    device: str | torch.device = "cpu",
    timeout_s: float | None = None,
) -> tuple[Callable[[str], tuple | None], TensorParallelState]:
    """Rewrite ``decoder`` in place into this rank's shard; return (shard_fn, TensorParallelState)."""
    config = decoder.config
    check_tp_degree(config, tp_degree)
    dev = rank_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialize_model_parallel(tp_degree, backend=default_backend(dev), timeout_s=timeout_s)
    rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_size()
    (q0, q1), (kv0, kv1) = head_ranges(config, tp, rank)
    E, D, F_, V = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    build = dict(device=decoder.model.embed_tokens.weight.device)

    for layer in decoder.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_bias = attn.q_proj.bias is not None
        _swap(attn, "q_proj", ColumnParallelLinear(E, H * D, bias=qkv_bias, gather_output=False, **build))
        for name in ("k_proj", "v_proj"):
            _swap(attn, name, ColumnParallelLinear(E, H_kv * D, bias=qkv_bias, gather_output=False,
                                                   output_range=(kv0 * D, kv1 * D), **build))
        _swap(attn, "o_proj", RowParallelLinear(H * D, E, bias=attn.o_proj.bias is not None, input_is_parallel=True,
                                                **build))
        attn.n_heads, attn.n_kv_heads = q1 - q0, kv1 - kv0  # the decoder reshapes by these
        mlp_bias = mlp.gate_proj.bias is not None
        for name in ("gate_proj", "up_proj"):
            _swap(mlp, name, ColumnParallelLinear(E, F_, bias=mlp_bias, gather_output=False, **build))
        _swap(mlp, "down_proj", RowParallelLinear(F_, E, bias=mlp_bias, input_is_parallel=True, **build))

    tied = decoder.lm_head.weight is decoder.model.embed_tokens.weight
    embed = ParallelEmbedding(V, E, **build)
    _swap(decoder.model, "embed_tokens", embed)
    lm_head = ColumnParallelLinear(E, V, bias=False, gather_output=True, output_sizes=embed.vocab_sizes, **build)
    if tied:
        lm_head.weight = embed.weight  # one shard serves both, as one tensor served both before
        old = decoder.lm_head
        decoder.lm_head = lm_head
        del old
    else:
        _swap(decoder, "lm_head", lm_head)

    shards = {}
    for mod_name, mod in decoder.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding)):
            shards[f"{mod_name}.weight"] = mod.weight_shard
            if mod.bias is not None:
                shards[f"{mod_name}.bias"] = mod.bias_shard
    state = TensorParallelState(tp_degree=tp, rank=rank, device=dev, heads=(q0, q1), kv_heads=(kv0, kv1),
                                kv_replicated=tp > H_kv)
    return shards.get, state


def _swap(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``parent.name``; if the old module holds real weights, slice them."""
    old = getattr(parent, name)
    if old.weight.device.type != "meta":
        new.load_full_weight(old.weight.detach(), None if getattr(old, "bias", None) is None else old.bias.detach())
    setattr(parent, name, new)
