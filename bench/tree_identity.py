"""``verispec bench tree-identity``: greedy identity of token trees on real models.

At temperature 0 every tree configuration (static and dynamic trees, every children mode, every
tree acceptor) must emit the target's own greedy text, token for token, at batch 1 and batch 3
(prompts of different lengths). The default is the Qwen pair (too large for the test suite, whose
tiny models and SmolLM2 run the same check); f32 by default, where a verify pass over a tree and
a one-token decode step agree to rounding, so a mismatch means a bug (bf16 can flip near-ties).
Writes ``tree_identity.json``; the exit status is 1 if any configuration diverged.
"""

from __future__ import annotations

import shlex
import time

import torch

from .common import bench_prompts, write_json

CONFIGS = [  # tree, children, acceptor
    ("2,2,1,1", "top", "multistep"), ("2,2,1,1", "sample", "multistep"), ("3,2,1", "distinct", "recursive"),
    ("3,2,1", "sample", "traversal"), ("2,1,1", "top", "greedy"), ("dynamic:8", "top", "multistep"),
    ("dynamic:16", "top", "traversal"), ("auto", "sample", "multistep"),
]


def register(sub) -> None:
    p = sub.add_parser("tree-identity", help="token trees at temperature 0 equal target-only greedy on real models")
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="a model name/path or self:N")
    p.add_argument("--amp", default="f32", choices=["f32", "bf16"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-set", default="code")
    p.add_argument("--k", type=int, default=5, help="k of dynamic trees (depth k - 1) and auto's MAX")
    p.add_argument("--name", default="tree_identity")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    load = dict(n_positions=512, batch_size=3, amp=args.amp, progress=True)
    target = LlamaForSampling.from_pretrained(args.target, **load)
    draft = args.draft if args.draft.startswith("self:") else LlamaForSampling.from_pretrained(args.draft, **load)
    prompts = bench_prompts(args.prompt_set, 3, target.tokenizer)
    rows = []
    failed = 0
    for batch in ([prompts[0]], prompts):
        seq_len = max(len(p) for p in batch) + args.max_new_tokens
        t0 = time.perf_counter()
        expected = target.sample(batch, seq_len, temperature=0)
        alone_s = time.perf_counter() - t0
        for tree, children, acceptor in CONFIGS:
            k = f"auto:{args.k}" if tree == "auto" else args.k if tree.startswith("dynamic:") else None
            gen = SpeculativeGenerator(draft, target, k, acceptor=acceptor, tree=tree, children=children)
            t0 = time.perf_counter()
            out = gen.sample(batch, seq_len, temperature=0)
            wall = time.perf_counter() - t0
            same = torch.equal(out, expected)
            first = None
            if not same:
                failed += 1
                diff = (out != expected).nonzero()
                first = {"row": int(diff[0, 0]), "position": int(diff[0, 1])}
            s = gen.last_stats
            rows.append({"batch": len(batch), "tree": tree, "children": children, "acceptor": acceptor,
                         "identical": same, "first_difference": first, "new_tokens": s.new_tokens,
                         "mean_tokens_per_pass": s.mean_tokens_per_pass, "nodes_per_pass": s.nodes_per_pass,
                         "wall_s": wall, "target_only_wall_s": alone_s, "shape_counts": dict(s.shape_counts)})
            print(f"batch {len(batch)} tree {tree:<10} {children:<8} {acceptor:<9} identical={same} "
                  f"tokens/pass={s.mean_tokens_per_pass:.2f} wall={wall:.1f}s (target alone {alone_s:.1f}s)")
    data = {"command": "verispec " + " ".join(shlex.quote(a) for a in getattr(args, "argv", [])),
            "target": args.target, "draft": args.draft, "amp": args.amp, "max_new_tokens": args.max_new_tokens,
            "prompt_set": args.prompt_set, "configs": len(CONFIGS), "diverged": failed, "runs": rows}
    path = write_json(args.name, data, args.out_dir)
    print(f"{len(rows) - failed}/{len(rows)} identical; wrote {path}")
    return 1 if failed else 0
