"""Decoder layers of a decode or verify step in one native call (fused.c's verispec_step, which
runs verispec_layer for each).

The ``cpu`` backend's path for few rows (B * T <= 16): the decoder hands its layers here when
every piece is one the native layer runs (fused q/k/v and gate/up projections, products of the
native kinds, the ``cpu`` backend's own attention, RoPE/append and norms, bf16 or fp32, CPU) and
falls back to the module path otherwise. Same kernels, same order, same roundings as the module
path, so the outputs agree bitwise (bf16) or to the last fp32 bit of RMSNorm's sum of squares
(fp32); tests/test_cpu_fused.py compares the two.
"""

from __future__ import annotations

import contextlib
import operator
import threading

import torch
from torch import nn

from .. import reference
from .build import get_lib
from .linear import MAX_M, SkinnyLinear
from .quant import Int8Linear, W8A8Linear

_KINDS = {SkinnyLinear: 0, Int8Linear: 1, W8A8Linear: 2}
HEAD = 16  # per-call words before the linears' words (see verispec_layer in fused.c)


def _linear_words(lin: nn.Module, dtype: torch.dtype, lib) -> tuple[list[int], list[torch.Tensor]] | None:
    """(the six int64 words fused.c reads for a linear layer, tensors they point into) or None."""
    kind = _KINDS.get(type(lin))
    if kind is None or (kind == 2 and not lib.verispec_w8a8_available()):
        return None
    w = lin.weight if kind == 0 else lin.qweight
    bias = lin.bias
    if not w.is_contiguous() or w.device.type != "cpu" or w.requires_grad:
        return None
    if (kind == 0 and w.dtype != dtype) or (bias is not None and (bias.dtype != dtype or bias.requires_grad)):
        return None
    keep = [w] + ([lin.scale] if kind else []) + ([bias.contiguous()] if bias is not None else [])
    words = [kind, w.data_ptr(), lin.scale.data_ptr() if kind else 0,
             keep[-1].data_ptr() if bias is not None else 0, w.shape[0], w.shape[1]]
    return words, keep


class LayerPlan:
    """The static words of one layer (norm weights and the four linears) and the tensors behind them."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, lib):
        attn, mlp = layer.self_attn, layer.mlp
        self.words: list[int] | None = None
        self.keep: list[torch.Tensor] = []
        lins = [attn._qkv, attn.o_proj, mlp._gate_up, mlp.down_proj]
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(n.dtype != dtype or not n.is_contiguous() or n.requires_grad for n in norms):
            return
        words = []
        for lin in lins:
            got = None if lin is None else _linear_words(lin, dtype, lib)
            if got is None:
                return
            words += got[0]
            self.keep += got[1]
        self.keep += list(norms)
        self.words = words
        # fused.c's word array: HEAD words (filled in by LayerStack and run_layers), then these
        self.array = torch.tensor([0] * HEAD + words, dtype=torch.int64)
        self.eps = (layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
        self.F = mlp._gate_up.out_features // 2


def applies(kernels, h: torch.Tensor, active_mask) -> bool:
    """Whether this forward can take the fused path (before looking at the layers)."""
    return applies_to(kernels, h.shape[0], h.shape[1], h.dtype, h.device, active_mask)


def applies_to(kernels, B: int, T: int, dtype: torch.dtype, device: torch.device, active_mask) -> bool:
    """:func:`applies` for a [B, T] step in ``dtype`` on ``device``."""
    from . import attention, layer

    return (
        active_mask is None
        and device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and B * T <= MAX_M
        and T <= attention.MAX_T
        and kernels.verify_attention is attention.verify_attention
        and kernels.kv_append is reference.kv_append
        and kernels.get("rope_append") is layer.rope_append
        and kernels.get("rms_norm") is layer.rms_norm
        and kernels.get("add_rms_norm") is layer.add_rms_norm
        and kernels.get("silu_mul") is layer.silu_mul
        and get_lib() is not None
        and not torch.is_grad_enabled()
    )


class LayerStack:
    """Every layer's words in one [L, HEAD + 24] int64 array (and their eps and attention scales),
    so a step runs all its layers in ONE native call (fused.c's verispec_step). The per-call
    words (residual stream, RoPE tables, positions, batch shape) are written as columns; the KV
    cache pointers only when the cache tensors change, after checking they fit."""

    def __init__(self, plans: list[LayerPlan], layers):
        self.plans = plans
        self.array = torch.stack([p.array for p in plans])  # [L, HEAD + 24]
        self.words = self.array.numpy()  # a view
        for i, p in enumerate(plans):
            self.words[i, 1:3] = (p.keep[-2].data_ptr(), p.keep[-1].data_ptr())  # norm weights
        attn0 = layers[0].self_attn
        self.shape = (attn0.n_heads, attn0.n_kv_heads, attn0.head_dim)
        self.words[:, 11:14] = self.shape
        self.words[:, 15] = [p.F for p in plans]
        self.floats = torch.tensor([[p.eps[0], p.eps[1], l.self_attn.scale] for p, l in zip(plans, layers)],
                                   dtype=torch.float32)  # [L, 3]
        self.failed = torch.zeros(1, dtype=torch.int64)
        # [2, MAX_M, D] in the plans' dtype (their norm weights'): a step's cos and sin rows, which
        # the native step copies from the RoPE tables
        self.rope = torch.empty(2, MAX_M, attn0.head_dim, dtype=plans[0].keep[-1].dtype)
        self.checked = None  # (KV cache pointers, B, dtype) whose fit was last checked


class _Fingerprint:
    """What a decoder's plans were built from, checked in a few C-level passes before every fused
    forward (a per-layer Python check cost ~0.45 ms of a 30 ms step, run with caches cold from the
    weight stream): every module and norm weight the plans read, found through the same dicts the
    decoder's own attribute lookups use, and every tensor's storage pointer (``.to()`` or
    ``.data =`` give a tensor new storage without replacing the object)."""

    def __init__(self, decoder: nn.Module, plans: list[LayerPlan]):
        dicts, keys, objs = [], [], []

        def add(d, k):
            dicts.append(d)
            keys.append(k)
            objs.append(d[k])

        layers = decoder.model.layers
        for i, layer in enumerate(layers):
            add(layers._modules, str(i))
            mods = layer._modules
            for name in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
                add(mods, name)
            add(mods["input_layernorm"]._parameters, "weight")
            add(mods["post_attention_layernorm"]._parameters, "weight")
            attn, mlp = mods["self_attn"], mods["mlp"]
            add(attn.__dict__, "_qkv")
            add(attn._modules, "o_proj")
            add(mlp.__dict__, "_gate_up")
            add(mlp._modules, "down_proj")
            for lin in (attn.__dict__["_qkv"], attn._modules["o_proj"], mlp.__dict__["_gate_up"], mlp._modules["down_proj"]):
                for d in (lin._parameters, lin._buffers) if lin is not None else ():
                    for k in d:  # a weight, bias, scale replaced by another tensor object
                        add(d, k)
        self.n = len(layers)
        self.dicts, self.keys, self.objs = dicts, keys, objs
        self.tensors = [t for p in plans for t in p.keep]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.scope = None  # the hold_plans() block in which this was last checked

    def holds(self, decoder: nn.Module) -> bool:
        return (len(decoder.model.layers) == self.n
                and all(map(operator.is_, map(operator.getitem, self.dicts, self.keys), self.objs))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)


_held = threading.local()  # .scope: the innermost hold_plans() block of this thread, or absent


@contextlib.contextmanager
def hold_plans():
    """A block in which the decoders' modules and weight storage are taken to stay as they are:
    each decoder's plans are checked (``_Fingerprint.holds``) at its first fused forward in the
    block, not at every one. The engine's own loops run inside one (``LlamaForSampling.sample``,
    ``SpeculativeGenerator.generate``/``sample``), where no user code runs between the forwards
    except the components handed to the loop (draft, acceptor, k-policy), which must not replace
    the models' modules or weight tensors. The check costs ~0.3 ms a forward of a 30-layer model
    (~570 objects and ~180 storage pointers read with caches cold from the weight stream), 3% of a
    135M model's step. Streams (``stream()``) do not hold: their caller runs between the steps.
    Weights edited in place are seen in either case (the kernels read the weights' memory).
    Per thread: a forward on another thread is checked as before."""
    prev = getattr(_held, "scope", None)
    _held.scope = object()  # each block its own token, kept alive by what it marks
    try:
        yield
    finally:
        _held.scope = prev


def plans_for(decoder: nn.Module, layers, dtype: torch.dtype) -> LayerStack | None:
    """Cached per decoder and dtype; rebuilt when a layer's modules were replaced or a weight
    given new storage (checked at every forward, or once per :func:`hold_plans` block)."""
    lib = get_lib()
    cache = decoder.__dict__.setdefault("_fused_plans", {})
    plans = cache.get(dtype)
    fp = cache.get(("fingerprint", dtype))
    scope = getattr(_held, "scope", None)
    if plans is None or fp is None or ((scope is None or fp.scope is not scope) and not fp.holds(decoder)):
        plans = [LayerPlan(l, dtype, lib) for l in decoder.model.layers]
        cache[dtype] = plans
        fp = cache[("fingerprint", dtype)] = _Fingerprint(decoder, plans)
        cache.pop(("stack", dtype), None)
    fp.scope = scope
    if not all(p.words is not None for p in plans[: len(layers)]):
        return None
    stack = cache.get(("stack", dtype))
    if stack is None or stack.plans is not plans:
        if not all(p.words is not None for p in plans):  # a prefix of fusable layers: stack just those
            return LayerStack(plans[: len(layers)], layers)
        stack = cache[("stack", dtype)] = LayerStack(plans, decoder.model.layers)
    return stack


def run_layers(stack: LayerStack, layers, ids, h, embed, rope, cache, positions, norm) -> torch.Tensor:
    """The first len(layers) layers of the stack in one native call (fused.c's verispec_step), on
    the embedding rows of ``ids`` [B, T] (``embed``: the table) or, with ``ids`` None, on ``h``
    [B, T, E]; returns the final residual stream's RMSNorm by ``norm`` [B, T, E]. ``rope``: (cos,
    sin) either [S, D] tables in the model dtype, whose rows positions[b] + t the native step
    copies itself, or the [B, T, D] rows (explicit position ids)."""
    lib = get_lib()
    L = len(layers)
    if ids is not None:
        B, T = ids.shape
        E = embed.shape[1]
        dtype = embed.dtype
        x = torch.empty(B, T, E, dtype=dtype)
        ids = ids.contiguous()
    else:
        B, T, E = h.shape
        dtype = h.dtype
        x = h.contiguous().clone()
    if norm.weight.shape != (E,):
        raise ValueError(f"final norm weight {tuple(norm.weight.shape)} does not fit hidden size {E}")
    y = torch.empty_like(x)
    cos, sin = rope
    H, H_kv, D = stack.shape
    S_max = cache.k[0].shape[2]
    first = reference.check_append_slots(positions, B, T, S_max)
    pos = torch.tensor(first, dtype=torch.int64)
    tables = cos.dim() == 2
    if tables:  # the native step copies the rows into the stack's buffers
        if cos.shape != sin.shape or cos.shape[1] != D or cos.dtype != dtype or not cos.is_contiguous() \
                or not sin.is_contiguous() or sin.dtype != dtype:
            raise ValueError(f"RoPE tables {tuple(cos.shape)} {cos.dtype} do not fit head size {D} in {dtype}")
        if max(first) + T > cos.shape[0]:
            raise IndexError(f"RoPE table of {cos.shape[0]} positions has no row {max(first) + T - 1}")
        cos_p, sin_p, tab = stack.rope[0].data_ptr(), stack.rope[1].data_ptr(), (cos.data_ptr(), sin.data_ptr())
    else:
        cos, sin = cos.contiguous(), sin.contiguous()
        cos_p, sin_p, tab = cos.data_ptr(), sin.data_ptr(), (None, None)
    ks, vs = cache.k[:L], cache.v[:L]
    ptrs = ([k.data_ptr() for k in ks], [v.data_ptr() for v in vs])
    key = (ptrs, B, dtype)
    w = stack.words
    if stack.checked != key:
        for i, (k, v) in enumerate(zip(ks, vs)):
            if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == dtype
                    and k.shape == v.shape and k.shape[0] >= B and k.shape[1:] == (H_kv, S_max, D)):
                raise ValueError(f"layer {i}: KV cache {tuple(k.shape)} {k.dtype} does not fit the fused layer")
        w[:L, 6], w[:L, 7] = ptrs  # k[:B], v[:B] start where k, v do
        stack.checked = key
    w[:L, 0], w[:L, 3], w[:L, 4], w[:L, 5] = x.data_ptr(), cos_p, sin_p, pos.data_ptr()
    w[:L, 8], w[:L, 9], w[:L, 10], w[:L, 14] = B, T, E, S_max
    rc = lib.verispec_step(stack.array.data_ptr(), L, w.shape[1], stack.floats.data_ptr(), int(dtype == torch.bfloat16),
                           torch.get_num_threads(), stack.failed.data_ptr(), B * T, E,
                           ids.data_ptr() if ids is not None else None, embed.data_ptr() if ids is not None else None,
                           embed.shape[0] if ids is not None else 0, norm.weight.data_ptr(), float(norm.eps), y.data_ptr(),
                           *tab)
    if rc == -5:
        bad = int(ids.reshape(-1)[int(stack.failed[0])])
        raise IndexError(f"token id {bad} is out of range for the embedding table of {embed.shape[0]} rows")
    if rc != 0:
        raise MemoryError(f"verispec_layer failed in layer {int(stack.failed[0])} (code {rc})")
    return y


def embedding_fits(embed: nn.Module, dtype: torch.dtype) -> bool:
    """Whether run_layers may copy the embedding rows itself (a plain table in the model dtype)."""
    if type(embed) is not nn.Embedding or embed.max_norm is not None:
        return False
    w = embed.weight
    return w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2


def norm_fits(norm: nn.Module, dtype: torch.dtype) -> bool:
    """Whether run_layers may run the final RMSNorm (its weight in the model dtype, on the CPU)."""
    w = getattr(norm, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()
            and w.dim() == 1 and not w.requires_grad)
