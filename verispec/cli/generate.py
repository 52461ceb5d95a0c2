"""``verispec generate``: stream text from exact speculative decoding, then print its statistics.

Defaults: target qwen2.5-coder-1.5b, draft qwen2.5-coder-0.5b, bf16, k=auto, greedy; named
models are fetched on first use. ``--draft none`` (or ``-k 1``) decodes with the target alone.
"""

from __future__ import annotations

import os
import sys

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with exact speculative decoding")
    p.add_argument("prompt", nargs="?", default="Write a Python function that checks whether a number is prime.",
                   help="prompt text ('-' reads it from stdin)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="draft: model name/path, 'ngram', 'self:N' (target's first N layers), or 'none'")
    p.add_argument("--draft-quant", default=None, choices=["int8", "w8a8"],
                   help="int8: the draft's weights as int8; w8a8: int8 weights and int8 activations (faster "
                        "still); either way a faster draft and the same output distribution")
    p.add_argument("-k", "--k", default="auto", help="tokens per verify pass (drafts + 1), or 'auto' / 'auto:MAX'")
    p.add_argument("--acceptor", default=None, help="token acceptor: default (exact rejection sampling), coupled (exact; one seed, one text for any k and draft), sample-match, greedy, typical (lossy) or module:attr")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--n-positions", type=int, default=None, help="cache length (default: what the run needs)")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--no-stats", action="store_true", help="leave out the statistics table (printed on stderr)")
    p.add_argument("--tp-degree", type=int, default=1,
                   help="tensor-parallel degree of the target: N > 1 starts N processes under torchrun "
                        "(N must divide the heads); the draft runs replicated on every rank")
    p.set_defaults(func=run)


def parse_k(text: str):
    """'4' -> 4, 'auto' / 'auto:MAX' kept as text (the generator turns it into AdaptiveK)."""
    from verispec.spec.policy import as_policy

    k = int(text) if text.strip().lstrip("-").isdigit() else text.strip()
    as_policy(k)  # validates: a clear error before any model is loaded
    return k


def _prompt(args, tokenizer) -> tuple[str, list[int]]:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text:
        raise ValueError("the prompt is empty")
    if args.chat:
        if not tokenizer.chat_template:
            raise ValueError(f"--chat: {args.target} has no chat template")
        return text, tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    return text, tokenizer.encode(text)


def run(args) -> int:
    import torch
    from rich.console import Console

    from verispec.kernels.cpu.fused import hold_plans
    from verispec.model import LlamaForSampling, Tokenizer, open_source
    from verispec.parallel.launch import in_torchrun, relaunch_under_torchrun
    from verispec.parallel.plan import check_tp_degree
    from verispec.spec import SpeculativeGenerator
    from verispec.spec.policy import as_policy

    from ._report import TextStream, stats_table

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    k = parse_k(args.k)
    draft_name = None if args.draft.lower() == "none" or k == 1 else args.draft
    if draft_name is None:
        k = 1
    is_model = bool(draft_name) and not (draft_name == "ngram" or draft_name.startswith(("self:", "ngram:")))
    if args.draft_quant and not is_model:
        raise ValueError(f"--draft-quant {args.draft_quant} needs a draft model; the draft is {args.draft!r}")
    if args.tp_degree > 1 and not in_torchrun():
        # resolve (fetch) the models and check the split once, here, rather than once per rank
        check_tp_degree(open_source(args.target, progress=True)[0], args.tp_degree)
        if is_model:
            open_source(draft_name, progress=True)
        # one process per rank; each runs this same command line and finds itself inside torchrun
        return relaunch_under_torchrun(args.tp_degree, "verispec", getattr(args, "argv", None) or sys.argv[1:])
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    console = Console(quiet=not is_rank0, highlight=False)  # every rank holds the same tokens; one prints
    err = Console(stderr=True, quiet=not is_rank0)

    target_path = open_source(args.target, progress=is_rank0)[2]
    tokenizer = Tokenizer.from_pretrained(target_path)
    text, ids = _prompt(args, tokenizer)
    max_k = as_policy(k).max_k
    seq_len = len(ids) + args.max_new_tokens
    n_positions = args.n_positions or seq_len + max_k + 1
    load = dict(n_positions=n_positions, amp=args.amp, kernel_backend=args.kernel_backend, progress=is_rank0)
    target = LlamaForSampling.from_pretrained(target_path, tp_degree=args.tp_degree, **load)
    draft = draft_name
    if is_model:
        draft = LlamaForSampling.from_pretrained(draft_name, tp_degree=1, quant=args.draft_quant, **load)  # replicated under TP
    gen = SpeculativeGenerator(draft, target, k, acceptor=args.acceptor)

    eos = list(target.config.eos_token_id) or None
    stream = TextStream(tokenizer)
    if not args.chat:  # a chat reply is printed alone; a plain continuation after its prompt
        console.print(text, end="", markup=False, soft_wrap=True)
    with hold_plans():  # printing between the steps changes no model
        for step in gen.stream(torch.tensor([ids]), seq_len, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, eos_token_id=eos):
            new = step.per_row().get(0, [])
            piece = stream.push([t for t in new if eos is None or t not in eos])
            if piece:
                console.print(piece, end="", markup=False, soft_wrap=True)
                console.file.flush()
    console.print(stream.flush(), markup=False, soft_wrap=True)
    if not args.no_stats:  # on stderr, so that stdout is the text alone
        quant = f" ({args.draft_quant} weights)" if args.draft_quant else ""
        what = f"{args.target} alone" if draft_name is None else f"{draft_name}{quant} -> {args.target}"
        err.print(stats_table(gen.last_stats.to_dict(), f"{what}, {args.amp}, T={args.temperature:g}"))
    return 0
