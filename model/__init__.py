"""Llama-family decoder, KV cache, checkpoint/tokenizer loading and LlamaForSampling."""

from .cache import KVCache
from .config import ConfigError, LlamaConfig, RopeScaling
from .decoder import Decoder
from .for_sampling import LlamaForSampling, amp_dtype, open_source
from .gguf_source import GGUFSource
from .loader import CheckpointError, SafetensorsSource
from .sampling import SamplingParams, logits_to_probs, sample_categorical
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Decoder",
    "GGUFSource",
    "KVCache",
    "LlamaConfig",
    "LlamaForSampling",
    "RopeScaling",
    "SafetensorsSource",
    "SamplingParams",
    "Tokenizer",
    "TokenizerError",
    "amp_dtype",
    "logits_to_probs",
    "open_source",
    "sample_categorical",
]
