"""``verispec generate``: stream text from exact speculative decoding, then print its statistics.

Defaults: target qwen2.5-coder-1.5b, draft qwen2.5-coder-0.5b (for another target: a registered
model sharing its vocabulary, else 'ngram'), the draft's weights in w8a8 where the CPU runs those
kernels, bf16, k=auto, greedy; named models are fetched on first use. stdout gets the generated
text alone; the statistics table and notes go to stderr.
"""

from __future__ import annotations

import os
import sys

from ._generate_plan import DEFAULT_TARGET, tree_acceptor, tree_k

DESCRIPTION = (
    "Generate text with exact speculative decoding: the output is distributed exactly as the target's "
    "own sampling (greedy: the very same text) whatever the draft, k or weight format of the draft. stdout "
    "gets the generated text only (the prompt is not echoed), so `verispec generate ... > out.txt` keeps "
    "the model's text; the statistics table and notes go to stderr. Every argument, the configs and the "
    "vocabularies are checked before any weights are loaded; an error is one line and exit status 1."
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with exact speculative decoding", description=DESCRIPTION)
    p.add_argument("prompt", nargs="?", default="Write a Python function that checks whether a number is prime.",
                   help="prompt text ('-' reads it from stdin); only the continuation is printed")
    p.add_argument("--target", default=DEFAULT_TARGET, help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default=None,
                   help="draft: a model name/path, 'ngram' or 'ngram:N' (prompt lookup), 'self:N' (the target's "
                        "first N layers) or 'none' (the target alone); a draft model must share the target's "
                        "vocabulary, checked before loading (default: the smallest registered model that shares "
                        "the target's vocabulary with at most half its parameters, so qwen2.5-coder-0.5b for the "
                        "default target; else 'ngram', said on stderr)")
    p.add_argument("--draft-quant", default="auto", choices=["auto", "none", "int8", "w8a8"],
                   help="weights of a draft model: int8 (int8 weights), w8a8 (int8 weights and activations, "
                        "faster still), none (--amp), auto (w8a8 where this CPU runs the w8a8 kernels, "
                        "AVX512-VNNI; else none). Any choice keeps the output distribution; ngram/self/none "
                        "drafts ignore auto and none")
    p.add_argument("-k", "--k", default="auto",
                   help="tokens per verify pass (drafts + 1), or 'auto' / 'auto:MAX' (adapted each step, "
                        "MAX 8 by default); k must be below the cache length (n_positions)")
    p.add_argument("--acceptor", default="default",
                   help="token acceptor: default (exact rejection sampling), coupled (exact; one seed, one text for "
                        "any k and draft), sample-match, greedy, typical (lossy) or module:attr")
    p.add_argument("--tree", default=None,
                   help="token trees: children per level (e.g. 2,2,1,1; the depth sets k), dynamic:N (N nodes "
                        "where the draft is likeliest, depth k - 1, k 5 unless given) or auto (k=auto picks a chain "
                        "or a tree each step); --acceptor then names a tree acceptor: multistep (for 'default'), "
                        "recursive, traversal, greedy (default: none, a chain)")
    p.add_argument("--children", default="sample", choices=["sample", "distinct", "top"],
                   help="with --tree: siblings i.i.d. from the draft, without replacement, or its likeliest")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="most tokens to generate; a reply cut there (no end-of-sequence token) is said on stderr")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with probability >= P (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed, an integer in [0, 2**63)")
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"], help="dtype of weights and activations")
    p.add_argument("--target-amx", action="store_true",
                   help="the target's bf16 products on Intel AMX tiles: verify passes of up to 16 tokens (long "
                        "chains, trees) cost about a one-token step; one-token steps 2-10%% slower (--amp bf16)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--n-positions", type=int, default=None,
                   help="KV-cache length (default: what the run needs, prompt + --max-new-tokens)")
    p.add_argument("--allow-beyond-max-positions", action="store_true",
                   help="allow a cache longer than the target's max_position_embeddings (positions the model "
                        "was not trained for); without it that is an error")
    p.add_argument("--kernel-backend", default=None,
                   help="kernel backend: torch, cpu, triton, nki or a registered one "
                        "(default: $VERISPEC_KERNELS, else cpu's native kernels where they build, else torch)")
    p.add_argument("--no-stats", action="store_true", help="leave out the statistics table (printed on stderr)")
    p.add_argument("--tp-degree", type=int, default=1,
                   help="tensor-parallel degree of the target: N > 1 starts N processes under torchrun "
                        "(N must divide the heads); the draft runs replicated on every rank")
    p.set_defaults(func=run)


def run(args) -> int:
    from verispec.parallel.launch import in_torchrun, relaunch_under_torchrun

    from ._generate_plan import plan

    if args.tp_degree > 1 and not in_torchrun():
        # check everything (and fetch the models) once, here, rather than once per rank
        plan(args, progress=True, with_prompt=args.prompt != "-")
        # one process per rank; each runs this same command line and finds itself inside torchrun
        return relaunch_under_torchrun(args.tp_degree, "verispec", getattr(args, "argv", None) or sys.argv[1:])
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    return _generate(args, plan(args, progress=is_rank0), is_rank0)


def _generate(args, p, is_rank0: bool) -> int:
    import torch
    from rich.console import Console

    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    from ._report import TextStream, stats_table

    console = Console(quiet=not is_rank0, highlight=False)  # every rank holds the same tokens; one prints
    err = Console(stderr=True, quiet=not is_rank0, highlight=False, soft_wrap=True)
    for note in p.notes:
        err.print(note, markup=False)
    load = dict(n_positions=p.n_positions, amp=args.amp, kernel_backend=args.kernel_backend, progress=is_rank0)
    target = LlamaForSampling.from_pretrained(p.target_path, tp_degree=args.tp_degree, amx=args.target_amx, **load)
    draft = p.draft
    if p.draft_path is not None:  # replicated under TP
        draft = LlamaForSampling.from_pretrained(p.draft_path, tp_degree=1, quant=p.quant, **load)
    if args.tree is None:
        gen = SpeculativeGenerator(draft, target, p.k, acceptor=args.acceptor)
    else:
        gen = SpeculativeGenerator(draft, target, tree_k(args, p.k), acceptor=tree_acceptor(args), tree=args.tree,
                                   children=args.children)

    eos = set(target.config.eos_token_id)
    stream = TextStream(p.tokenizer)
    ended = False  # an end-of-sequence token came (else the reply stopped at --max-new-tokens)
    for step in gen.stream(torch.tensor([p.ids]), len(p.ids) + args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=sorted(eos) or None):
        new = step.per_row().get(0, [])
        ended = ended or any(t in eos for t in new)
        piece = stream.push([t for t in new if t not in eos])
        if piece:
            console.print(piece, end="", markup=False, soft_wrap=True)
            console.file.flush()
    console.print(stream.flush(), markup=False, soft_wrap=True)
    if not ended:
        err.print(f"note: stopped at --max-new-tokens {args.max_new_tokens} before the end of the answer; raise "
                  "--max-new-tokens to continue", markup=False)
    if not args.no_stats:  # on stderr, so that stdout is the text alone
        quant = f" ({p.quant_label})" if p.quant_label else ""
        what = f"{args.target} alone" if p.draft is None else f"{p.draft}{quant} -> {args.target}"
        rows = [("draft weights", p.quant_row)] if p.quant_row else []
        err.print(stats_table(gen.last_stats.to_dict(), f"{what}, {args.amp}, T={args.temperature:g}", rows))
    return 0
