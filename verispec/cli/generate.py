"""``verispec generate``: sample from a model (target-only until the speculative loop lands)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", default="def quicksort(arr):", help="prompt text")
    p.add_argument("--target", default="qwen2.5-coder-1.5b", help="model name, HF directory or .gguf file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--n-positions", type=int, default=2048)
    p.add_argument("--kernel-backend", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from rich.console import Console

    from verispec.model import LlamaForSampling

    console = Console()
    model = LlamaForSampling.from_pretrained(
        args.target, n_positions=args.n_positions, amp=args.amp, kernel_backend=args.kernel_backend, progress=True
    )
    tok = model.tokenizer
    ids = torch.tensor([tok.encode(args.prompt)])
    out = model.sample(
        ids, min(ids.shape[1] + args.max_new_tokens, args.n_positions), temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=list(model.config.eos_token_id) or None,
    )
    console.print(args.prompt + tok.decode(out[0, ids.shape[1]:].tolist()), highlight=False, markup=False)
    console.print(f"[dim]{model.last_stats['new_tokens']} tokens, {model.last_stats['tokens_per_s']:.2f} tokens/s[/]")
    return 0
