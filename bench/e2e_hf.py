"""The Hugging Face transformers side of ``verispec bench e2e``: the very weights verispec runs,
written to an HF directory by ``verispec convert`` in the benchmark's dtype, loaded by
transformers in that dtype, and timed with ``generate()``, target-only and with
``assistant_model`` (transformers' assisted generation).

transformers is a benchmark and test dependency only; it is imported here, lazily.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

HF_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# generation-config fields that steer transformers' assisted generation
ASSISTED_FIELDS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def default_hf_root() -> Path:
    """Converted directories are cached under the model cache ($VERISPEC_HOME or ~/.cache/verispec)."""
    from verispec.model.hub import cache_dir

    return cache_dir() / "hf-converted"


def hf_dir_for(model: str, amp: str, hf_root: str | os.PathLike) -> Path:
    """Cache directory of ``model`` converted to ``amp``: a registered name keeps its name; a path
    gets its name plus a hash of its location and modification times, so an edited model is
    converted again."""
    p = Path(os.path.expanduser(str(model)))
    if not p.exists():
        return Path(hf_root) / f"{model}-{amp}"
    files = [p] + (sorted(p.iterdir()) if p.is_dir() else [])
    key = str(p.resolve()) + "".join(f"|{f.name}:{f.stat().st_mtime_ns}" for f in files)
    return Path(hf_root) / f"{p.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{amp}"


def ensure_hf_dir(model: str, amp: str, hf_root) -> tuple[Path, bool]:
    """-> (HF directory of ``model`` in dtype ``amp``, whether it was converted now)."""
    if amp not in HF_DTYPES:
        raise ValueError(f"amp must be one of {sorted(HF_DTYPES)}, got {amp!r}")
    out = hf_dir_for(model, amp, hf_root)
    # convert() writes model.safetensors last, by an atomic rename: its presence means complete
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out, False
    from verispec.model.convert import convert

    convert(model, out, dtype=amp, progress=True, overwrite=True)  # our cache: an interrupted conversion's leftovers
    return out, True


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RuntimeError("the HF comparison needs transformers (pip install -e '.[test]'), or run with --no-hf") from None
    transformers.logging.set_verbosity_error()  # its sampling-flag notes would flood the table
    transformers.logging.disable_progress_bar()
    return transformers


def load_hf(path: Path, amp: str, device: str):
    """transformers' AutoModelForCausalLM on ``path`` in dtype ``amp``, EOS stopping disabled
    (verispec decodes without EOS here too, so both make exactly max_new_tokens)."""
    transformers = _transformers()
    dtype = HF_DTYPES[amp]
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()
    got = {p.dtype for p in model.parameters()}
    if got != {dtype}:
        raise RuntimeError(f"transformers loaded {path} with parameter dtypes {sorted(map(str, got))}, not {dtype}")
    model.generation_config.eos_token_id = None
    return model


def hf_settings(model, assistant=None) -> dict:
    """What transformers was asked to do, for the JSON: version, attention kernel, and the
    assisted-generation settings (the assistant's generation config, else transformers' defaults)."""
    transformers = _transformers()
    out = {"transformers": transformers.__version__, "attn_implementation": getattr(model.config, "_attn_implementation", None),
           "dtype": str(next(model.parameters()).dtype)}
    if assistant is not None:
        defaults_fn = getattr(transformers.GenerationConfig, "_get_default_generation_params", None)
        defaults = defaults_fn() if defaults_fn else {}
        cfg = assistant.generation_config
        out["assisted"] = {f: getattr(cfg, f, None) if getattr(cfg, f, None) is not None else defaults.get(f)
                           for f in ASSISTED_FIELDS}
        out["assisted"]["source"] = "transformers defaults (not tuned)"
    return out


@torch.inference_mode()
def hf_generate(model, prompt: torch.Tensor, new_tokens: int, temperature: float, seed: int, assistant=None) -> dict:
    """One timed ``model.generate`` on ``prompt`` [L]: pure sampling at ``temperature`` (no top-k,
    top-p or repetition penalty), greedy at 0. -> tokens [L + new], wall_s, new_tokens."""
    device = model.device
    ids = prompt[None].to(device)  # [1, L]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                  top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    if temperature > 0:
        torch.manual_seed(seed)  # transformers samples from torch's global generator only
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)  # [1, L + new]
    sync()
    wall = time.perf_counter() - t0
    return {"tokens": out[0].cpu(), "wall_s": wall, "new_tokens": out.shape[1] - ids.shape[1]}
