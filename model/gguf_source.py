"""GGUF checkpoints as a TensorSource: tensors renamed to Hugging Face's convention, dequantized to
fp32 with the ``gguf`` package, and a LlamaConfig read from the file's metadata.

Two llama.cpp conventions are undone here:
- ``llama``-arch files store the rows of Q and K permuted for interleaved-pair RoPE (llama.cpp's
  converter applies ``permute`` to q_proj/k_proj); the decoder uses the half-split RoPE of HF, so
  the permutation is inverted on load. ``qwen2`` files are written unpermuted.
- GGUF shapes are listed fastest-axis first; HF shapes are the reverse.

Nothing is cached: each ``load`` dequantizes its tensor from the memory-mapped file (about 15 s
for all of Qwen2.5-Coder-1.5B Q4_K_M). ``verispec convert`` writes an HF directory for repeated
fast loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .config import SUPPORTED_ARCHITECTURES, ConfigError, LlamaConfig, RopeScaling
from .loader import CheckpointError, Shard

# GGUF tensor name -> HF name. ``{i}`` is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; unknown tensors keep their GGUF name (and then fail the
    strict key check with that name listed)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return gguf_name


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: per head, rows (0, 1, 2, 3, ...) were stored as
    (0, D/2, 1, D/2+1, ...) so that interleaved pairs rotate together. Works for weights
    ``[n_heads * D, in]`` and biases ``[n_heads * D]``."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation (HF half-split rows -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _read_reader(path: Path):
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on corrupt input
        if size < 4 or path.read_bytes()[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes)") from None
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor {t.name} needs bytes up to {end}, the file has {size}"
            )
    return reader


class GGUFSource:
    """A single GGUF file read through a memory map. ``config`` comes from its metadata."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self._reader = _read_reader(self.path)
        self.metadata = {}
        for key, field in self._reader.fields.items():
            if key.startswith("tokenizer.ggml.") and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                              "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                continue  # large arrays: read on demand by the tokenizer
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise CheckpointError(f"{self.path}: corrupt metadata field {key!r} ({e})") from None
        supported = set(gguf.quants._type_traits) | {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
        self._tensors = {}
        for t in self._reader.tensors:
            if t.tensor_type not in supported:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                    f"which the gguf package cannot dequantize"
                )
            self._tensors[hf_name(t.name)] = t
        self.config = self._build_config()

    # ---- metadata -> LlamaConfig ----------------------------------------------------------------

    def _get(self, key: str, default=None, required: bool = False):
        if key in self.metadata:
            return self.metadata[key]
        if required:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks required key {key!r}")
        return default

    def field_array(self, key: str) -> list | None:
        """A (possibly large) array field such as ``tokenizer.ggml.tokens``; None when absent."""
        field = self._reader.fields.get(key)
        return None if field is None else field.contents()

    def _build_config(self) -> LlamaConfig:
        arch = self._get("general.architecture", required=True)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{self.path}: unknown architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        a = arch + "."
        vocab = self._get(a + "vocab_size")
        if vocab is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise CheckpointError(f"{self.path}: no {a}vocab_size and no tokenizer.ggml.tokens to count")
            vocab = len(tokens.data)
        hidden = int(self._get(a + "embedding_length", required=True))
        n_heads = int(self._get(a + "attention.head_count", required=True))
        head_dim = int(self._get(a + "attention.key_length", 0) or 0)
        scaling_type = self._get(a + "rope.scaling.type", "none")
        if "rope_freqs.weight" in self._tensors:
            raise ConfigError(
                f"{self.path}: llama3-style rope frequency factors (rope_freqs tensor) are not supported "
                f"in GGUF files; load the original HF checkpoint instead"
            )
        if scaling_type in ("none", None):
            rope = RopeScaling()
        elif scaling_type == "linear":
            rope = RopeScaling(rope_type="linear", factor=float(self._get(a + "rope.scaling.factor", required=True)))
        else:
            raise ConfigError(f"{self.path}: unsupported rope scaling type {scaling_type!r} (supported: none, linear)")
        eos = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            v = self._get(key)
            if v is not None and int(v) not in eos:
                eos.append(int(v))
        bos = self._get("tokenizer.ggml.bos_token_id")
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get(a + "feed_forward_length", required=True)),
            num_hidden_layers=int(self._get(a + "block_count", required=True)),
            num_attention_heads=n_heads,
            num_key_value_heads=int(self._get(a + "attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(self._get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._get(a + "rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(self._get(a + "context_length", 2048)),
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in self._tensors,
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            model_type=arch,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=tuple(eos),
        )

    # ---- TensorSource ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def gguf_type(self, name: str) -> str:
        """The stored quantization type (``Q4_K``, ``F16``, ...) of an HF-named tensor."""
        return self._tensors[name].tensor_type.name

    def load(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # F32 tensors are views of the read-only memory map
            arr = arr.copy()
        w = torch.from_numpy(arr).reshape(self.shape(name))
        if self.config.model_type == "llama":
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                w = unpermute_rope_rows(w, self.config.num_attention_heads)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                w = unpermute_rope_rows(w, self.config.num_key_value_heads)
        if shard is not None:
            dim, start, stop = shard
            w = w.narrow(dim, start, stop - start)
        return w.contiguous()
