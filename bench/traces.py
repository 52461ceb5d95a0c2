"""``verispec bench traces``: record greedy agreement traces of a draft/target pair on the bench prompts.

For each prompt: the target's greedy continuation, and per new token whether the draft's greedy
choice after the same text is that token, and the draft's probability of its choice (its
confidence, which k=auto's drafting gate hears) (spec/simulate.py ``greedy_trace``). ``verispec bench
policy --traces FILE`` replays them: at temperature 0 a trace fixes what every pass accepts for any
k, so k-policies are compared on real texts with no timing noise (costs are modelled). Writes
NAME.json in --out-dir.
"""

from __future__ import annotations

import argparse
import time

from .common import bench_prompts, load_model, machine_info, parse_prompt_sets, write_json


def register(sub) -> None:
    p = sub.add_parser("traces", help="record greedy draft/target agreement traces for `bench policy --traces`")
    p.add_argument("--target", default="qwen2.5-coder-1.5b", help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="model name, HF directory or .gguf file")
    p.add_argument("--draft-quant", default=None, choices=["int8", "w8a8"], help="store the draft's weights as int8")
    p.add_argument("--prompt-sets", default="code,prose", help="comma-separated prompt sets of bench/prompts.json")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per prompt")
    p.add_argument("--random-prompts", action="store_true", help="random token prompts (models without tokenizer)")
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--name", default="traces", help="results file stem")
    p.add_argument("--out-dir", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from verispec.model import open_source
    from verispec.model.tokenizer import Tokenizer
    from verispec.spec.simulate import greedy_trace

    sets = parse_prompt_sets(args.prompt_sets, args.prompts, args.random_prompts)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config, _, src = open_source(args.target, progress=True)
    tok = None if args.random_prompts else Tokenizer.from_pretrained(src)
    prompts = {s: bench_prompts(s, args.prompts, tok, config.vocab_size if args.random_prompts else None)
               for s in sets}
    n_positions = max(len(p) for ps in prompts.values() for p in ps) + args.max_new_tokens
    if n_positions > config.max_position_embeddings:
        raise ValueError(f"longest prompt + --max-new-tokens = {n_positions} exceeds the target's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    target = load_model(args.target, args, n_positions)
    draft = load_model(args.draft, args, n_positions, quant=args.draft_quant)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft vocab {draft.vocab_size} != target vocab {target.vocab_size}")
    t0 = time.perf_counter()
    both = {s: [greedy_trace(target, draft, p, args.max_new_tokens, confidence=True) for p in ps]
            for s, ps in prompts.items()}
    traces = {s: [t for t, _ in b] for s, b in both.items()}
    confidence = {s: [[round(c, 5) for c in cs] for _, cs in b] for s, b in both.items()}
    data = {"benchmark": "traces", "machine": machine_info(), "target": str(args.target), "draft": str(args.draft),
            "draft_quant": args.draft_quant, "amp": args.amp, "max_new_tokens": args.max_new_tokens,
            "seconds": time.perf_counter() - t0,
            "agreement": {s: sum(map(sum, t)) / sum(map(len, t)) for s, t in traces.items()}, "traces": traces,
            "confidence": confidence}
    path = write_json(args.name, data, args.out_dir)
    for s, a in data["agreement"].items():
        print(f"{s}: {len(traces[s])} prompts, greedy agreement {a:.3f}")
    print(f"wrote {path}")
    return 0
