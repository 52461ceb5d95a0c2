"""The Llama-family decoder: RMSNorm, RoPE (default/linear/llama3), GQA attention, SwiGLU MLP.

No I/O, no sampling, no distributed code here: tensor parallelism rewrites a built model
(``verispec.parallel``), loaders fill its parameters (``verispec.model.loader``). One forward
serves prefill, one-token decode and k-token verify; attention and cache writes go through
the kernel contract (``verispec.kernels``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import KernelSet, reference
from .cache import KVCache
from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:  # [D/2] fp32
    D = config.head_dim
    # explicit CPU: the table must be real even when the model is built on the meta device
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    rs = config.rope_scaling
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)  # long wavelengths: divide
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


apply_rope = reference.apply_rope  # x * cos + rotate_half(x) * sin (see kernels/reference.py)


class Attention(nn.Module):
    """GQA attention. ``n_heads``/``n_kv_heads`` are this rank's heads (a TP plan may lower them)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        E, D = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = D
        self.scale = D**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(E, self.n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(E, self.n_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, E]
        cos: torch.Tensor,  # [B, 1, T, D] in x.dtype
        sin: torch.Tensor,  # [B, 1, T, D], first half negated (see apply_rope)
        k_cache: torch.Tensor,  # [B, H_kv, S_max, D]
        v_cache: torch.Tensor,  # [B, H_kv, S_max, D]
        positions: torch.Tensor,  # [B] first cache slot of this block per row
        kernels: KernelSet,
        active_mask: torch.Tensor | None,  # [B, T, T] bool or None (causal)
    ) -> torch.Tensor:  # [B, T, E]
        B, T, _ = x.shape
        rope_append = kernels.get("rope_append") or reference.rope_append  # rotate q and k, append k and v
        q = rope_append(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, k_cache, v_cache, positions,
                        kernels.kv_append)  # [B, H, T, D]
        o = kernels.verify_attention(q, k_cache, v_cache, positions, self.scale, active_mask)  # [B, H, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        E, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(E, F_, bias=config.mlp_bias)
        self.up_proj = nn.Linear(E, F_, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F_, E, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, silu_mul=None) -> torch.Tensor:
        """``silu_mul``: a backend's SiLU(gate) * up (default the reference's)."""
        return self.down_proj((silu_mul or reference.silu_mul)(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, k_cache, v_cache, positions, kernels, active_mask):
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        rms_norm = kernels.get("rms_norm") or reference.rms_norm
        add_rms_norm = kernels.get("add_rms_norm") or reference.add_rms_norm
        attn = self.self_attn(rms_norm(x, norm1.weight, norm1.eps), cos, sin, k_cache, v_cache, positions, kernels,
                              active_mask)
        x, h = add_rms_norm(x, attn, norm2.weight, norm2.eps)  # the residual add and the next norm
        return x + self.mlp(h, kernels.get("silu_mul"))


class Decoder(nn.Module):
    """Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.*`` and ``lm_head``)."""

    def __init__(self, config: LlamaConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        # built on the meta device to be loaded: no random init (normal_ there imports torch._dynamo, 2-3 s)
        table = torch.empty(config.vocab_size, config.hidden_size) if torch.empty(0).is_meta else None
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE table for every slot of the cache: [S_max, D] fp32, cast per forward
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), rope_inv_freq(config))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        half = emb.shape[-1] // 2
        signed_sin = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)  # rotate_half's sign, folded in
        self.register_buffer("rope_sin", signed_sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B] first cache slot per row
        cache: KVCache,
        kernels: KernelSet,
        logits_at: torch.Tensor | None = None,  # [B, n] token indices in T whose logits are wanted
        active_mask: torch.Tensor | None = None,  # [B, T, T] bool (token trees)
        position_ids: torch.Tensor | None = None,  # [B, T] RoPE positions (default positions + t)
        num_layers: int | None = None,  # run only the first N layers (layer-skip self-draft)
    ) -> torch.Tensor:  # [B, T or n, V] fp32
        B, T = input_ids.shape
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        if position_ids is None:
            position_ids = positions[:, None].long() + torch.arange(T, device=input_ids.device)  # [B, T]
        h = self.model.embed_tokens(input_ids)  # [B, T, E]
        cos = self.rope_cos[position_ids].to(h.dtype)[:, None]  # [B, 1, T, D]
        sin = self.rope_sin[position_ids].to(h.dtype)[:, None]
        for i, layer in enumerate(layers):
            h = layer(h, cos, sin, cache.k[i][:B], cache.v[i][:B], positions, kernels, active_mask)
        if logits_at is not None:  # the norm is row-wise: normalising only these rows is the same
            idx = logits_at.long()
            h = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, n, E]
        h = (kernels.get("rms_norm") or reference.rms_norm)(h, self.model.norm.weight, self.model.norm.eps)
        return self.lm_head(h).float()

    def rope_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables [S_max, D] cast to ``dtype`` (cached; re-cast when the tables are
        replaced, e.g. moved to another device): their rows are the cast rows of the fp32 tables,
        bitwise, since the cast is element-wise."""
        cos, sin = self.rope_cos, self.rope_sin
        got = self.__dict__.get("_rope_cast")
        if got is None or got[0] is not cos or got[1] is not sin or got[2] != dtype:
            got = self.__dict__["_rope_cast"] = (cos, sin, dtype, cos.to(dtype).contiguous(), sin.to(dtype).contiguous())
        return got[3], got[4]
