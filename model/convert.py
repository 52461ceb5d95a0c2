"""Write a Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) from a GGUF file, a named model or an HF
directory, so that other tools (transformers among them) load the very weights verispec uses.

model.safetensors is streamed tensor by tensor, so converting needs memory for one tensor at a
time, not for the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .loader import check_source, expected_tensors

log = logging.getLogger("verispec.model")

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
CONVERT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# files of a model directory that a loader would read beside (or instead of) what convert writes:
# with overwrite=True they are removed first, so no stale index, shard or tokenizer pairs with the new weights
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors", "*.safetensors.partial", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json")


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple], dtype: torch.dtype, tensor_fn, on_tensor=None):
    """Write ``{name: tensor_fn(name)}`` as one safetensors file without holding them all.

    The header (names, shapes, offsets) is known from ``shapes`` before any tensor is loaded.
    """
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = item
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    tmp = path.with_suffix(".safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in shapes.items():
            t = tensor_fn(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(shape)}")
            f.write(t.view(torch.uint8).numpy().tobytes())
            if on_tensor:
                on_tensor(name)
    os.replace(tmp, path)


def convert(model: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "f32", progress: bool = False,
            overwrite: bool = False) -> Path:
    """Convert ``model`` (GGUF, named model or HF directory) into an HF directory at ``out_dir``.

    A non-empty ``out_dir`` is refused unless ``overwrite``: then the model files there (config,
    safetensors weights, shards and index, tokenizer files) are replaced and other files kept."""
    from .decoder import Decoder
    from .for_sampling import open_source
    from .gguf_source import GGUFSource
    from .tokenizer import Tokenizer

    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(CONVERT_DTYPES)}, got {dtype!r}")
    torch_dtype = CONVERT_DTYPES[dtype]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    given = Path(os.path.expanduser(str(model)))
    if given.exists() and out.resolve() == given.resolve():
        raise ValueError(f"output directory {out} is the input model itself")
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # checked before a named model is fetched
        raise FileExistsError(f"output directory {out} is not empty; convert into a new or empty directory, "
                              "or overwrite its model files (verispec convert --force, overwrite=True)")
    config, source, src_path = open_source(model, progress=progress)
    if out.resolve() == Path(src_path).resolve():
        raise ValueError(f"output directory {out} is the input model itself")
    with torch.device("meta"):
        meta = Decoder(config, 1)
    shapes = expected_tensors(meta)  # tied heads appear once, as model.embed_tokens.weight
    check_source(source, shapes, config.tie_word_embeddings)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _MODEL_FILES if overwrite else ():
        for stale in out.glob(pattern):
            if stale.is_file():
                stale.unlink()

    if isinstance(source, GGUFSource):
        tokenizer = Tokenizer.from_gguf(source)
    elif (Path(src_path) / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_hf_dir(src_path)
    else:
        tokenizer = None
        log.warning("%s has no tokenizer.json: the output directory will have no tokenizer", src_path)
    if tokenizer is not None:
        tokenizer.save(out)

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = _HF_DTYPE_NAMES[torch_dtype]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id}
    if config.eos_token_id:
        gen["eos_token_id"] = list(config.eos_token_id) if len(config.eos_token_id) > 1 else config.eos_token_id[0]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    bar = _Bar(progress, f"writing {out / 'model.safetensors'}", len(shapes))
    try:
        write_safetensors_streaming(out / "model.safetensors", shapes, torch_dtype, source.load, bar.advance)
    finally:
        bar.close()
    return out


class _Bar:
    def __init__(self, enabled: bool, label: str, total: int):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task(label, total=total)
            self.progress.start()

    def advance(self, _name=None):
        if self.progress:
            self.progress.advance(self.task)

    def close(self):
        if self.progress:
            self.progress.stop()
