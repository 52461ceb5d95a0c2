"""``verispec generate``: sample from a model (target-only until the speculative loop lands)."""

from __future__ import annotations

import os
import sys


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
    p.add_argument("--tp-degree", type=int, default=1,
                   help="tensor-parallel degree: N > 1 starts N processes under torchrun (N must divide the heads)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from rich.console import Console

    from verispec.model import LlamaForSampling, open_source
    from verispec.parallel.launch import in_torchrun, relaunch_under_torchrun
    from verispec.parallel.plan import check_tp_degree

    if args.tp_degree > 1 and not in_torchrun():
        # resolve (fetch) the model and check the split once, here, rather than once per rank
        check_tp_degree(open_source(args.target, progress=True)[0], args.tp_degree)
        # one process per rank; each runs this same command line and finds itself inside torchrun
        return relaunch_under_torchrun(args.tp_degree, "verispec", getattr(args, "argv", None) or sys.argv[1:])
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    console = Console(quiet=not is_rank0)  # every rank holds the same tokens; one prints them
    model = LlamaForSampling.from_pretrained(
        args.target, n_positions=args.n_positions, amp=args.amp, kernel_backend=args.kernel_backend,
        tp_degree=args.tp_degree, progress=is_rank0,
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
