"""``verispec convert MODEL OUT_DIR``: write an HF directory from a GGUF, named model or HF dir."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("convert", help="write an HF model directory (config, safetensors, tokenizer) from a model")
    p.add_argument("model", help="a .gguf file, a registered model name, or an HF model directory")
    p.add_argument("out_dir", help="directory to write (created if missing; if it exists it must be empty, or see --force)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="dtype of model.safetensors")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT_DIR: the model files there (config, safetensors weights, "
                        "shards and index, tokenizer files) are replaced, other files kept; without it a "
                        "non-empty OUT_DIR is an error")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from verispec.model.convert import convert

    out = convert(args.model, args.out_dir, dtype=args.dtype, progress=True, overwrite=args.force)
    Console().print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0
