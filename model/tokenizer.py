"""Tokenizer: a ``tokenizers`` byte-level BPE with the model's special tokens and chat template.

Built from an HF directory (``tokenizer.json`` + ``tokenizer_config.json``) or from the
vocabulary embedded in a GGUF file (``tokenizer.ggml.*``); ``save`` writes an HF directory that
transformers' ``AutoTokenizer`` loads to the same token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

# Split regexes of the byte-level BPE pre-tokenizers, keyed by GGUF ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_GGUF_PRE = ("smollm", "qwen2", "llama-bpe", "gpt-2", "default")

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or a template that cannot be rendered."""


def _pre_tokenizer_for(pre: str, where: str):
    """(normalizer, pre_tokenizer, ignore_merges) matching the HF tokenizer.json of that family."""
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        ), False
    if pre in ("gpt-2", "default"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("qwen2", "llama-bpe"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT), behavior="isolated")
        norm = normalizers.NFC() if pre == "qwen2" else None
        seq = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return norm, seq, pre == "llama-bpe"
    raise TokenizerError(
        f"{where}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: {', '.join(SUPPORTED_GGUF_PRE)})"
    )


def _token_str(v) -> str | None:
    """tokenizer_config.json names special tokens as strings or as AddedToken dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        model_max_length: int | None = None,
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.model_max_length = model_max_length
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise TokenizerError(f"{role} token {tok!r} is not in the vocabulary")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike) -> "Tokenizer":
        """From an HF directory, a .gguf file, or a registered model name."""
        p = Path(os.path.expanduser(str(path_or_name)))
        if p.is_dir():
            return cls.from_hf_dir(p)
        if p.is_file() and p.suffix.lower() == ".gguf":
            return cls.from_gguf(p)
        if p.is_file():
            raise TokenizerError(f"{p}: not a model directory or a .gguf file")
        from .hub import is_registered, resolve

        if is_registered(str(path_or_name)):
            return cls.from_gguf(resolve(str(path_or_name)))
        raise FileNotFoundError(f"{path_or_name}: no such directory or file, and not a registered model name")

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        d = Path(directory)
        tj = d / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"{d}: no tokenizer.json (only fast, tokenizer.json-based tokenizers are supported)")
        try:
            backend = _Backend.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot parse ({e})") from None
        cfg = {}
        if (d / "tokenizer_config.json").exists():
            try:
                cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{d / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        template = cfg.get("chat_template")
        if template is None and (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None and (d / "chat_template.json").exists():
            template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            unk_token=_token_str(cfg.get("unk_token")),
            chat_template=template,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            model_max_length=cfg.get("model_max_length"),
        )

    @classmethod
    def from_gguf(cls, path_or_source) -> "Tokenizer":
        """Rebuild the byte-level BPE that llama.cpp's converter stored in ``tokenizer.ggml.*``."""
        from .gguf_source import GGUFSource

        src = path_or_source if isinstance(path_or_source, GGUFSource) else GGUFSource(path_or_source)
        where = str(src.path)
        kind = src.metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"{where}: tokenizer model {kind!r} is not supported (only byte-level BPE, tokenizer.ggml.model='gpt2')"
            )
        tokens = src.field_array("tokenizer.ggml.tokens")
        merges = src.field_array("tokenizer.ggml.merges")
        types = src.field_array("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens or [])
        if not tokens or merges is None:
            raise TokenizerError(f"{where}: GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        if len(types) != len(tokens):
            raise TokenizerError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
        # Unused ids are llama.cpp's "[PADnnn]" fillers up to the embedding size: not real tokens.
        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != _UNUSED}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise TokenizerError(f"{where}: malformed merge {m!r}")
            pairs.append((a, b))
        norm, pre, ignore_merges = _pre_tokenizer_for(src.metadata.get("tokenizer.ggml.pre", "default"), where)
        backend = _Backend(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
        if norm is not None:
            backend.normalizer = norm
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(t, special=(ty == _CONTROL), normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (_CONTROL, _USER_DEFINED)
        ]
        backend.add_tokens(added)  # keeps their vocabulary ids, as transformers' added_tokens do

        def name(key):
            i = src.metadata.get(f"tokenizer.ggml.{key}_token_id")
            return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

        add_bos = bool(src.metadata.get("tokenizer.ggml.add_bos_token", False))
        bos = name("bos")
        if add_bos and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return cls(
            backend,
            bos_token=bos,
            eos_token=name("eos"),
            pad_token=name("padding"),
            unk_token=None,  # byte-level BPE never produces an unknown token
            chat_template=src.metadata.get("tokenizer.chat_template"),
            add_bos_token=add_bos,
            model_max_length=src.config.max_position_embeddings,
        )

    # ---- use ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs):
        """Render the model's chat template the way transformers does (same jinja2 settings)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        from .chat_template import render_chat_template

        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token, unk_token=self.unk_token,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- HF directory output ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length or 1_000_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
