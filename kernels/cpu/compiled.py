"""The ``cpu`` backend's compiled decoder: a decode or verify step of few rows (B * T <= 16) in
ONE native call (fused.c's ``verispec_step``), applied once to a built model, the way a
tensor-parallel plan rewrites one.

:func:`compile_decoder` (the backend's ``compile`` extra, which ``LlamaForSampling`` calls at
load and again on ``recompile()``) does three things to the decoder and returns a
:class:`CompiledDecoder`, a callable with the decoder's forward signature:

1. every plain ``nn.Linear`` becomes a :class:`SkinnyLinear` (the same parameters; its few-row
   products stream each weight once through gemv.c; a :class:`TileLinear`, on AMX tiles, for a
   model loaded with ``amx=True``), and layers that expose a ``product`` (the
   tensor-parallel layers) get the same product;
2. each layer's q/k/v weights (and gate/up weights) are laid out in ONE buffer, of which the
   registered parameters are views: ``named_parameters()`` and ``state_dict()`` show exactly the
   memory the native step reads, so in-place edits and ``load_state_dict`` are seen at once;
3. the layers' weights, shapes and constants are written into typed structs (step.h, mirrored
   in abi.py and checked at load).

At every call :class:`CompiledDecoder` checks, in a few C-level passes, that the plan still
describes the model: no parameter, buffer or submodule was registered anywhere since it was
built (torch's global registration hooks count them: ``layer.q_proj.weight = Parameter(...)``,
``load_state_dict(..., assign=True)``, a replaced module), every weight it reads still has the
storage it had (``.data =``, ``.to()``), and no forward hook or pre-hook is installed on any of
its modules. When something changed it rebuilds the plan (re-laying out a q/k/v or gate/up group
whose parameters no longer view one buffer: the new values are copied in and the registered
parameters, same objects, view it from then on). Where the native step cannot represent the
model (another module type, a subclass, a hook, fp16, more rows, another kernel backend's
kernels, a token tree's mask that is not a CPU bool [B, T, T] tensor) the decoder's own module
path runs. Token trees take the native step: ``active_mask`` goes to the attention kernel as
uint8 and ``position_ids`` give the RoPE rows. A change the checks cannot see (a
patched ``forward`` method, a changed ``eps``) needs ``LlamaForSampling.recompile()``.

Same kernels, same order, same roundings as the module path of the ``cpu`` backend, so the
outputs agree bitwise (bf16) or to the last fp32 bit of RMSNorm's sum of squares (fp32);
tests/test_cpu_compiled.py compares the two.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from .. import reference
from .abi import VsLayer, VsLinear, VsStep
from .attention import MAX_T
from .build import get_lib
from .linear import MAX_M, SkinnyLinear, TileLinear, skinny_linear, tile_linear
from .quant import Int8Linear, W8A8Linear

_KINDS = {nn.Linear: 0, SkinnyLinear: 0, Int8Linear: 1, W8A8Linear: 2, TileLinear: 3}

# ---- what changed since a plan was built ------------------------------------------------------

_registrations = [0]  # parameters, buffers and modules registered on any module, ever


def _count(*_args):
    _registrations[0] += 1


_hooks_installed = False


def _install_registration_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        from torch.nn.modules import module as M

        M.register_module_parameter_registration_hook(_count)
        M.register_module_buffer_registration_hook(_count)
        M.register_module_module_registration_hook(_count)
        _hooks_installed = True


def _global_forward_hooks() -> bool:
    from torch.nn.modules import module as M

    return bool(M._global_forward_hooks or M._global_forward_pre_hooks)


# ---- laying out q/k/v and gate/up in one buffer ------------------------------------------------


def _tensor_names(lin: nn.Module) -> list[str]:
    kind = _KINDS[type(lin)]
    names = ["weight"] if kind in (0, 3) else ["qweight", "scale"]
    return names + (["bias"] if getattr(lin, "bias", None) is not None else [])


def _get(lin: nn.Module, name: str) -> torch.Tensor:
    return lin._parameters[name] if name in lin._parameters else lin._buffers[name]


def _adjacent(ts: list[torch.Tensor]) -> bool:
    """Whether ``ts`` lie back to back in one storage (each contiguous), in order."""
    if not all(t.is_contiguous() for t in ts):
        return False
    base = ts[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != base for t in ts):
        return False
    return all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(ts, ts[1:]))


def _group(lins: list[nn.Module], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """Lay the linears' tensors out back to back (copying only where they are not yet) and return
    the fused views, [weight or qweight, scale?, bias?], or None if they cannot be fused."""
    first = lins[0]
    kind = _KINDS.get(type(first))
    if kind is None or any(type(m) is not type(first) for m in lins):
        return None
    names = _tensor_names(first)
    if any(_tensor_names(m) != names for m in lins):
        return None
    fused = []
    for name in names:
        ts = [_get(m, name) for m in lins]
        if any(t.device.type != "cpu" or t.dtype != ts[0].dtype for t in ts) or len({t.shape[1:] for t in ts}) != 1:
            return None
        if name in ("weight", "bias") and ts[0].dtype != dtype:
            return None
        if not _adjacent(ts):
            with torch.inference_mode(False), torch.no_grad():
                buf = torch.cat([t.detach() for t in ts])
                start = 0
                for t in ts:
                    t.data = buf[start : start + t.shape[0]]  # the same tensor object, now a view of buf
                    start += t.shape[0]
            ts = [_get(m, name) for m in lins]
        base = ts[0]
        rows = sum(t.shape[0] for t in ts)
        fused.append(base.as_strided((rows, *base.shape[1:]), base.stride()))
    return fused


def _linear_struct(kind: int, tensors: list[torch.Tensor], has_bias: bool) -> VsLinear:
    w = tensors[0]
    scale = tensors[1].data_ptr() if kind in (1, 2) else None
    bias = tensors[-1].data_ptr() if has_bias else None
    return VsLinear(kind, w.data_ptr(), scale, bias, w.shape[0], w.shape[1])


def _single(lin: nn.Module, dtype: torch.dtype):
    """(kind, [tensors]) of one linear the native step can run, or None."""
    kind = _KINDS.get(type(lin))
    if kind is None:
        return None
    ts = [_get(lin, n) for n in _tensor_names(lin)]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in ts):
        return None
    if (kind in (0, 3) and ts[0].dtype != dtype) or (getattr(lin, "bias", None) is not None and ts[-1].dtype != dtype):
        return None
    return kind, ts


# ---- the plan ---------------------------------------------------------------------------------


class _Plan:
    """Everything one decoder's native step reads, and what to check before trusting it."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype, layers: ctypes.Array, n: int, modules, tensors):
        self.dtype, self.layers, self.n = dtype, layers, n
        self.hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.tensors = tensors  # every tensor the structs point into (kept alive by this list)
        self.ptrs = [t.data_ptr() for t in tensors]
        self.registrations = _registrations[0]
        attn = decoder.model.layers[0].self_attn
        self.shape = (attn.n_heads, attn.n_kv_heads, attn.head_dim)
        self.cache_key = None  # (KV cache pointers, B) written into the layer structs

    def holds(self) -> bool:
        """Nothing registered since the plan was built, and every weight in the storage it read."""
        return self.registrations == _registrations[0] and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs

    def hooked(self) -> bool:
        """A forward hook on one of the plan's modules, or a global one: the module path runs them."""
        return any(map(len, self.hook_dicts)) or _global_forward_hooks()


def _plan(decoder: nn.Module) -> _Plan | None:
    """Build the native plan of ``decoder`` (laying out q/k/v and gate/up groups), or None where
    the native step cannot run it."""
    from ...model.decoder import MLP, Attention, DecoderLayer, RMSNorm  # the module types the step implements

    lib = get_lib()
    if lib is None:
        return None
    norm, embed, head = decoder.model.norm, decoder.model.embed_tokens, decoder.lm_head
    dtype = norm.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32) or type(norm) is not RMSNorm or not len(decoder.model.layers):
        return None
    structs, modules, tensors = [], [decoder, decoder.model, embed, norm, head], [norm.weight]
    for layer in decoder.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = (layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm)
        if (type(layer), type(attn), type(mlp)) != (DecoderLayer, Attention, MLP) or any(
                type(n) is not RMSNorm for n in parts[3:]) or any("forward" in m.__dict__ for m in parts):
            return None
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(n.dtype != dtype or n.device.type != "cpu" or not n.is_contiguous() for n in norms):
            return None
        qkv_mods, gu_mods = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        qkv, gu = _group(qkv_mods, dtype), _group(gu_mods, dtype)
        o, down = _single(attn.o_proj, dtype), _single(mlp.down_proj, dtype)
        if qkv is None or gu is None or o is None or down is None:
            return None
        E, H, H_kv, D = norm.weight.shape[0], attn.n_heads, attn.n_kv_heads, attn.head_dim
        F_ = mlp.gate_proj.out_features
        shapes = [(qkv[0].shape, ((H + 2 * H_kv) * D, E)), (o[1][0].shape, (E, H * D)), (gu[0].shape, (2 * F_, E)),
                  (down[1][0].shape, (E, F_)), (norms[0].shape, (E,)), (norms[1].shape, (E,)),
                  ((attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features),
                   (H * D, H_kv * D, H_kv * D)), ((mlp.up_proj.out_features,), (F_,))]
        if any(tuple(got) != want for got, want in shapes):
            return None
        if (lib.verispec_w8a8_available() == 0
                and any(type(m) is W8A8Linear for m in [*qkv_mods, *gu_mods, attn.o_proj, mlp.down_proj])):
            return None
        s = VsLayer()
        s.norm_in, s.norm_post = norms[0].data_ptr(), norms[1].data_ptr()
        s.qkv = _linear_struct(_kind(attn.q_proj, dtype), qkv, attn.q_proj.bias is not None)
        s.o = _linear_struct(_kind(attn.o_proj, dtype), o[1], attn.o_proj.bias is not None)
        s.gate_up = _linear_struct(_kind(mlp.gate_proj, dtype), gu, mlp.gate_proj.bias is not None)
        s.down = _linear_struct(_kind(mlp.down_proj, dtype), down[1], mlp.down_proj.bias is not None)
        s.F = mlp.gate_proj.out_features
        s.eps_in, s.eps_post, s.attn_scale = layer.input_layernorm.eps, layer.post_attention_layernorm.eps, attn.scale
        structs.append(s)
        modules += [*parts, *qkv_mods, *gu_mods, attn.o_proj, mlp.down_proj]
        tensors += [*norms, *(_get(m, n) for m in [*qkv_mods, *gu_mods, attn.o_proj, mlp.down_proj]
                              for n in _tensor_names(m))]
    array = (VsLayer * len(structs))(*structs)
    return _Plan(decoder, dtype, array, len(structs), modules, tensors)


def _kind(lin: nn.Module, dtype: torch.dtype) -> int:
    """The native step's product kind of a linear: a TileLinear of an fp32 model runs the fp32
    vector product, as its module path does."""
    kind = _KINDS[type(lin)]
    return 0 if kind == 3 and dtype != torch.bfloat16 else kind


def _prepare(decoder: nn.Module, amx: bool = False) -> None:
    """The one-off rewrite: SkinnyLinear products (TileLinear with ``amx``), and the native product
    for layers with a ``product`` (tensor-parallel layers)."""
    if get_lib() is None:
        return
    cls, product = (TileLinear, tile_linear) if amx else (SkinnyLinear, skinny_linear)
    for m in decoder.modules():
        if type(m) in (nn.Linear, SkinnyLinear, TileLinear):
            m.__class__ = cls
        elif hasattr(type(m), "product"):  # a layer that names its product (parallel/layers.py)
            m.product = product


def _native_mask(active_mask, B: int, T: int) -> bool:
    """Whether the native step takes ``active_mask``: None (causal) or a CPU bool [B, T, T] tensor
    (anything else goes to the module path, whose kernels raise the contract's error)."""
    return active_mask is None or (isinstance(active_mask, torch.Tensor) and active_mask.device.type == "cpu"
                                   and active_mask.dtype == torch.bool and tuple(active_mask.shape) == (B, T, T))


class CompiledDecoder:
    """The decoder with the ``cpu`` backend's native step (see the module docstring): call it as
    the decoder's forward; :meth:`rebuild` re-reads the model."""

    def __init__(self, decoder: nn.Module, amx: bool = False):
        _install_registration_hooks()
        _prepare(decoder, amx)
        self.decoder = decoder
        self._plan = None
        self._none_at = None  # the registration count when building a plan last gave None
        self._kernels_checked = None  # the KernelSet last found to be the cpu backend's own
        self._rope = None  # (cos table, sin table, dtype, cast cos, cast sin)
        self.rebuild()

    def rebuild(self) -> None:
        """Re-read the decoder now (after a change the checks cannot see: a patched forward, a changed eps)."""
        with torch.no_grad():
            self._plan = _plan(self.decoder)
        self._none_at = _registrations[0] if self._plan is None else None

    @property
    def native(self) -> bool:
        """Whether the model can take the native step now (for few-row forwards)."""
        plan = self._current()
        return plan is not None and not plan.hooked()

    def _current(self) -> _Plan | None:
        plan = self._plan
        if plan is None:  # the model did not fit the step: look again once something is registered
            if self._none_at != _registrations[0]:
                self.rebuild()
        elif not plan.holds():
            self.rebuild()
        return self._plan

    def _own_kernels(self, kernels) -> bool:
        if kernels is self._kernels_checked:
            return True
        from . import attention, layer, sampling  # noqa: F401

        ok = (kernels.verify_attention is attention.verify_attention and kernels.kv_append is reference.kv_append
              and kernels.get("rope_append") is layer.rope_append and kernels.get("rms_norm") is layer.rms_norm
              and kernels.get("add_rms_norm") is layer.add_rms_norm and kernels.get("silu_mul") is layer.silu_mul)
        if ok:
            self._kernels_checked = kernels
        return ok

    def __call__(self, input_ids, positions, cache, kernels, logits_at=None, active_mask=None, position_ids=None,
                 num_layers=None):
        B, T = input_ids.shape
        plan = None
        if (_native_mask(active_mask, B, T) and B * T <= MAX_M and T <= MAX_T and input_ids.device.type == "cpu"
                and not torch.is_grad_enabled() and (num_layers is None or num_layers >= 1)
                and self._own_kernels(kernels)):
            plan = self._current()
        if plan is None or plan.hooked():
            return self.decoder(input_ids, positions, cache, kernels, logits_at=logits_at, active_mask=active_mask,
                                position_ids=position_ids, num_layers=num_layers)
        h = self._step(plan, input_ids, positions, cache, position_ids, active_mask,
                       plan.n if num_layers is None else min(num_layers, plan.n))
        if logits_at is not None:
            idx = logits_at.long()
            h = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, n, E]
        head = self.decoder.lm_head
        if type(head) in (SkinnyLinear, TileLinear):  # the bf16 logits widened to fp32 in the product itself
            return skinny_linear(h, head.weight, head.bias, out_f32=True, tiles=head.tiles)
        return head(h).float()

    def _rope_tables(self, dtype):
        d = self.decoder
        got = self._rope
        if got is None or got[0] is not d.rope_cos or got[1] is not d.rope_sin or got[2] != dtype:
            got = self._rope = (d.rope_cos, d.rope_sin, dtype, d.rope_cos.to(dtype).contiguous(),
                                d.rope_sin.to(dtype).contiguous())
        return got[3], got[4]

    def _step(self, plan: _Plan, ids, positions, cache, position_ids, active_mask, L: int) -> torch.Tensor:
        """The first L layers and the final norm in one native call; returns the normed [B, T, E]."""
        lib = get_lib()
        dtype, (H, H_kv, D) = plan.dtype, plan.shape
        d = self.decoder
        embed, norm = d.model.embed_tokens, d.model.norm
        B, T = ids.shape
        E = norm.weight.shape[0]
        S_max = cache.k[0].shape[2]
        first = reference.check_append_slots(positions, B, T, S_max)
        s = VsStep()
        pos = torch.tensor(first, dtype=torch.int64)
        x = torch.empty(B, T, E, dtype=dtype)
        w = embed.weight
        if (type(embed) is nn.Embedding and embed.max_norm is None and w.dtype == dtype and w.device.type == "cpu"
                and w.is_contiguous() and w.dim() == 2 and w.shape[1] == E):
            ids = ids.contiguous()
            s.ids, s.embed, s.V = ids.data_ptr(), w.data_ptr(), w.shape[0]
        else:  # another embedding module: its rows, computed by the module
            h = embed(ids)
            if h.dtype != dtype or h.shape != x.shape:
                raise ValueError(f"embedding output {tuple(h.shape)} {h.dtype} does not fit the model's [B, T, {E}] {dtype}")
            x.copy_(h)
        rope = torch.empty(2, B * T, D, dtype=dtype)  # the step's cos and sin rows
        if position_ids is None:  # rows positions[b] + t of the cast tables, copied by the native step
            cos_t, sin_t = self._rope_tables(dtype)
            if max(first) + T > cos_t.shape[0]:
                raise IndexError(f"RoPE table of {cos_t.shape[0]} positions has no row {max(first) + T - 1}")
            s.cos_table, s.sin_table = cos_t.data_ptr(), sin_t.data_ptr()
        else:
            rope[0].copy_(d.rope_cos[position_ids].reshape(B * T, D))
            rope[1].copy_(d.rope_sin[position_ids].reshape(B * T, D))
        ks, vs = cache.k[:L], cache.v[:L]
        key = ([k.data_ptr() for k in ks], [v.data_ptr() for v in vs], B)
        if plan.cache_key != key:
            for i, (k, v) in enumerate(zip(ks, vs)):
                if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == dtype and k.device.type == "cpu"
                        and k.shape == v.shape and k.shape[0] >= B and k.shape[1:] == (H_kv, S_max, D)):
                    raise ValueError(f"layer {i}: KV cache {tuple(k.shape)} {k.dtype} does not fit the native step")
                plan.layers[i].k_cache, plan.layers[i].v_cache = k.data_ptr(), v.data_ptr()
            plan.cache_key = key
        y = torch.empty_like(x)
        if active_mask is not None:  # [B, T, T] bool -> uint8, 1: query t sees new slot j; alive until the call returns
            mask = active_mask.to(torch.uint8).contiguous()
            s.mask = mask.data_ptr()
        s.x, s.cos, s.sin, s.positions, s.norm, s.y = (x.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr(),
                                                      pos.data_ptr(), norm.weight.data_ptr(), y.data_ptr())
        s.B, s.T, s.E, s.H, s.H_kv, s.D, s.S_max, s.n_layers = B, T, E, H, H_kv, D, S_max, L
        s.norm_eps, s.bf16, s.threads = norm.eps, int(dtype == torch.bfloat16), torch.get_num_threads()
        rc = lib.verispec_step(ctypes.byref(s), plan.layers)
        if rc == -5:
            bad = int(ids.reshape(-1)[s.failed])
            raise IndexError(f"token id {bad} is out of range for the embedding table of {s.V} rows")
        if rc != 0:
            raise MemoryError(f"the native decoder step failed in layer {s.failed} (code {rc})")
        return y


def compile_decoder(decoder: nn.Module, amx: bool = False) -> CompiledDecoder:
    """The ``cpu`` backend's ``compile`` extra: rewrite ``decoder`` once for the native step and
    return the callable that runs it (see the module docstring). ``amx``: every bf16 product on
    AMX tiles (TileLinear), the caller having checked ``tiles_available()``."""
    return CompiledDecoder(decoder, amx)
