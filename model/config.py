"""LlamaConfig: a frozen, validated description of a Llama-family decoder.

Built from a Hugging Face ``config.json`` (transformers 4.x ``rope_theta``/``rope_scaling`` or
5.x ``rope_parameters``) or from GGUF metadata; never looked up by model name. A new
variant is a field here, never a copied module.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class ConfigError(ValueError):
    """A config that names an unsupported architecture or holds inconsistent values."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"  # llama | qwen2
    bos_token_id: int | None = None
    eos_token_id: tuple = ()  # one or more ids that end a sequence

    def __post_init__(self):
        if self.head_dim == 0:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        rs = self.rope_scaling
        if rs.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope scaling type {rs.rope_type!r} (supported: default, linear, llama3)")
        if rs.rope_type != "default" and not rs.factor > 0:
            raise ConfigError(f"rope scaling factor must be positive, got {rs.factor}")
        if rs.rope_type == "llama3" and not rs.high_freq_factor > rs.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")

    @property
    def architecture(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.model_type]

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            by_arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            model_type = next((by_arch[a] for a in archs if a in by_arch), None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture (model_type={d.get('model_type')!r}, architectures={d.get('architectures')}); "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} (Llama-family models use silu)")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required fields: {', '.join(missing)}")
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta/rope_scaling
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or rp or {}
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rs = RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rs,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        """A transformers-compatible config.json (both 4.x and 5.x read these keys)."""
        rs = self.rope_scaling
        scaling = None if rs.rope_type == "default" else {k: v for k, v in asdict(rs).items()}
        d = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        else:
            d["use_sliding_window"] = False
        return d
