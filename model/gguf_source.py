"""GGUF checkpoints as a TensorSource: tensors renamed to Hugging Face's convention, dequantized to
fp32 with the ``gguf`` package (``gguf.quants``), and a LlamaConfig read from the file's metadata
(parsed by ``gguf_file``).

Two llama.cpp conventions are undone here:
- ``llama``-arch files store the rows of Q and K permuted for interleaved-pair RoPE (llama.cpp's
  converter applies ``permute`` to q_proj/k_proj); the decoder uses the half-split RoPE of HF, so
  the permutation is inverted on load. ``qwen2`` files are written unpermuted.
- GGUF shapes are listed fastest-axis first; HF shapes are the reverse.

Each ``load`` dequantizes its tensor from the file (15-25 s for all of Qwen2.5-Coder-1.5B
Q4_K_M), a block of rows at a time straight into a tensor of the requested dtype, reading the
file with plain reads: no page of the file stays mapped in the process and fp32 exists for one
block only. Named models keep the result in the cache (``converted``); ``verispec convert``
writes an HF directory.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .config import SUPPORTED_ARCHITECTURES, ConfigError, LlamaConfig, RopeScaling
from .gguf_file import TensorInfo, read_gguf
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
_BLOCK_ELEMENTS = 1 << 20  # dequantized per step: 4 MiB of fp32


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


def llama3_rope_factors(head_dim: int, theta: float, rs: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, as llama.cpp stores them in ``rope_freqs``."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    wavelen = 2 * math.pi / freqs
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / rs.factor + smooth)
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, rs.factor, mid))


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float, original_ctx: int,
                                where: str) -> RopeScaling:
    """Recover llama3 rope-scaling parameters from a ``rope_freqs`` tensor.

    In the smooth band, ``(1/f - 1/factor) / (1 - 1/factor)`` is linear in ``1/wavelength`` with
    slope ``original_ctx / (high - low)`` and intercept ``-low / (high - low)``, so two smooth
    points fix ``low`` and ``high`` for a given ``original_ctx``. The result is accepted only if
    it reproduces every stored factor; anything else is refused rather than approximated.
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (head_dim // 2,):
        raise ConfigError(f"{where}: rope_freqs has shape {f.shape}, expected ({head_dim // 2},)")
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return RopeScaling()
    inv_wavelen = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)
    mid = (f > 1 + 1e-6) & (f < factor - 1e-6)
    low, high = 1.0, 4.0  # Llama 3.1/3.2's values; kept when the band holds fewer than 2 points
    if mid.sum() >= 2:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
        span = original_ctx / slope
        low = -intercept * span
        high = low + span
    rs = RopeScaling(rope_type="llama3", factor=factor, low_freq_factor=float(low), high_freq_factor=float(high),
                     original_max_position_embeddings=int(original_ctx))
    if not np.allclose(llama3_rope_factors(head_dim, theta, rs), f, rtol=1e-5, atol=1e-6):
        raise ConfigError(
            f"{where}: rope_freqs does not follow llama3 rope scaling (no factor/low/high/original context "
            f"reproduces it); this rope variant is not supported"
        )
    return rs


_PARSED: dict = {}  # (path, size, mtime, ctime, inode) -> (metadata, infos) of the last few large files
_PARSE_KEEP_BYTES = 16 << 20  # smaller files parse in milliseconds: never kept


def _parse(path: Path) -> tuple[dict, list[TensorInfo]]:
    """Metadata and tensor directory of a GGUF file. A run opens a model's file several times
    (config, tokenizer, weights) and a 151k-token vocabulary takes a second to parse: the result
    is kept while the file's size, times and inode stay the same. Callers must not modify it."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _PARSED:
        return _PARSED[key]
    buf = np.memmap(path, dtype=np.uint8, mode="r")  # for the metadata only; unmapped after
    parsed = read_gguf(path, buf)
    del buf
    if st.st_size >= _PARSE_KEEP_BYTES:
        while len(_PARSED) >= 4:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = parsed
    return parsed


class GGUFSource:
    """A single GGUF file read through a memory map. ``config`` comes from its metadata."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        self.dtype = torch.float32  # what load() returns unless told otherwise
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if self.path.stat().st_size < 4:
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic bytes)")
        self.metadata, infos = _parse(self.path)
        supported = {int(t) for t in gguf.quants._type_traits} | {int(gguf.GGMLQuantizationType.F32),
                                                                   int(gguf.GGMLQuantizationType.F16)}
        self._tensors: dict[str, TensorInfo] = {}
        for t in infos:
            if t.ggml_type not in supported:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has quantization type {gguf.GGMLQuantizationType(t.ggml_type).name}, "
                    f"which the gguf package cannot dequantize"
                )
            self._tensors[hf_name(t.name)] = t
        # llama3 rope scaling travels as a tensor of per-frequency factors, not as a weight
        self._rope_freqs = self._tensors.pop("rope_freqs.weight", None)
        try:
            self.config = self._build_config()
        except (TypeError, ValueError) as e:  # ConfigError from validation, or a mistyped metadata value
            if str(self.path) in str(e):
                raise
            raise ConfigError(f"{self.path}: invalid model metadata: {e}") from None

    # ---- metadata -> LlamaConfig ----------------------------------------------------------------

    def _get_f32(self, key: str, default: float) -> float:
        """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
        v = self._get(key)
        return default if v is None else float(str(np.float32(v)))

    def _get(self, key: str, default=None, required: bool = False):
        if key in self.metadata:
            return self.metadata[key]
        if required:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks required key {key!r}")
        return default

    def field_array(self, key: str) -> list | None:
        """A (possibly large) array field such as ``tokenizer.ggml.tokens``; None when absent."""
        return self.metadata.get(key)

    def _build_config(self) -> LlamaConfig:
        arch = self._get("general.architecture", required=True)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{self.path}: unknown architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        a = arch + "."
        vocab = self._get(a + "vocab_size")
        if vocab is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise CheckpointError(f"{self.path}: no {a}vocab_size and no tokenizer.ggml.tokens to count")
            vocab = len(tokens)
        hidden = int(self._get(a + "embedding_length", required=True))
        n_heads = int(self._get(a + "attention.head_count", required=True))
        head_dim = int(self._get(a + "attention.key_length", 0) or 0)
        value_dim = int(self._get(a + "attention.value_length", head_dim) or 0)
        if value_dim != head_dim:
            raise ConfigError(f"{self.path}: key length {head_dim} differs from value length {value_dim}; not supported")
        scaling_type = self._get(a + "rope.scaling.type", "none")
        theta = self._get_f32(a + "rope.freq_base", 10000.0)
        if self._rope_freqs is not None:
            if scaling_type not in ("none", None):
                raise ConfigError(f"{self.path}: both rope_freqs and rope scaling type {scaling_type!r}")
            factors = self._dequantize(self._rope_freqs).reshape(-1)
            rope = llama3_scaling_from_factors(
                factors, head_dim or hidden // n_heads, theta,
                int(self._get(a + "rope.scaling.original_context_length", 8192)), str(self.path),
            )
        elif scaling_type in ("none", None):
            rope = RopeScaling()
        elif scaling_type == "linear":
            rope = RopeScaling(rope_type="linear", factor=self._get_f32(a + "rope.scaling.factor", 0.0))
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
            rms_norm_eps=self._get_f32(a + "attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=theta,
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
        return self._tensors[name].shape

    def gguf_type(self, name: str) -> str:
        """The stored quantization type (``Q4_K``, ``F16``, ...) of an HF-named tensor."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self._tensors[name].ggml_type).name

    def _dequantize(self, info: TensorInfo) -> np.ndarray:
        out = torch.empty(info.shape, dtype=torch.float32)
        self._dequantize_into(info, out)
        return out.numpy()

    def _dequantize_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Dequantize ``info`` into ``out`` (its shape, any float dtype) a block of rows at a time,
        each block cast from fp32 as it is written (the same bits as casting the whole tensor)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(info.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        cols = info.dims[0] if info.dims else 1
        row_bytes = cols // block * type_size
        n_rows = info.nbytes // row_bytes if row_bytes else 0
        rows = out.view(n_rows, cols)
        step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
        with open(self.path, "rb") as f:
            for r0 in range(0, n_rows, step):
                r1 = min(n_rows, r0 + step)
                raw = np.empty((r1 - r0, row_bytes), dtype=np.uint8)
                f.seek(info.offset + r0 * row_bytes)
                if f.readinto(raw) != raw.nbytes:
                    raise CheckpointError(f"{self.path}: truncated GGUF file: tensor {info.name} ends past the end of the file")
                try:
                    arr = dequantize(raw, qtype)
                except Exception as e:
                    raise CheckpointError(f"{self.path}: cannot dequantize {info.name} ({qtype.name}): {e}") from None
                rows[r0:r1] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(r1 - r0, cols))

    def load(self, name: str, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The HF-named tensor (or its shard) dequantized to ``dtype`` (default: ``self.dtype``)."""
        w = torch.empty(self.shape(name), dtype=dtype or self.dtype)
        self._dequantize_into(self._tensors[name], w)
        if self.config.model_type == "llama":
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                w = unpermute_rope_rows(w, self.config.num_attention_heads)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                w = unpermute_rope_rows(w, self.config.num_key_value_heads)
        if shard is not None:
            dim, start, stop = shard
            w = w.narrow(dim, start, stop - start)
        return w.contiguous()
