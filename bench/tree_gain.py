"""``verispec bench tree-gain``: tokens per pass of token trees against chains, paired, untimed.

Each tree configuration (tree x acceptor x children) decodes every prompt of the set, all prompts
as one batch, with its tree acceptor wrapped in ``PairedTreeGain``: per row-pass, the acceptor's
expected path length given the drafted tree (``--samples`` re-runs on private uniforms) and, for
children ``sample``/``distinct``, the expected drafts kept by token-wise and by block verification
of the tree's first-child path, which is a chain draft of the tree's depth. Their ratio is the
tree's gain over the chain of its depth from the same drafts and contexts, with a standard error.
Each chain k of ``--ks`` decodes the same prompts with ``PairedBlockGain`` (its expected tokens
per pass under both rules from its own drafts), so the tree can also be set against deeper chains
(not paired: different texts). Nothing is timed (acceptance only; the wrappers cost acceptor calls).
Writes NAME.json and NAME.png.
"""

from __future__ import annotations

import shlex
import time

import torch

from .common import bench_prompts, is_model_draft, machine_info, write_json

METHOD = (
    "Per tree configuration: tree_tokens_per_pass = 1 + the mean over row-passes of the tree acceptor's expected "
    "path length given the drafted tree (estimated by re-running the acceptor --samples times on the same inputs "
    "with private uniforms; the generator's own decisions are untouched); tree_tokens_per_pass_realised = the "
    "decisions the run made. For children sample/distinct the first sibling is a draw from q, so the first-child "
    "path is a chain draft of the tree's depth: chain_token_wise_tokens_per_pass and chain_block_tokens_per_pass "
    "are 1 + the expected drafts that token-wise rejection sampling / block verification keep on it (sum of "
    "prod min(1, p/q), sum of block weights), and gain_over_*_chain = tree / chain over the same row-passes, "
    "with a delta-method standard error (_se). Chains (--ks): PairedBlockGain on each chain run, its own drafts "
    "(token-wise and block expected tokens per pass). Every prompt of the set decodes as one batch; later passes "
    "near the end of the sequence are shallower, as in any run."
)


def register(sub) -> None:
    p = sub.add_parser("tree-gain", help="token trees against chains: expected tokens per pass from the same drafts "
                                         "(untimed)")
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--draft-quant", default=None, choices=[None, "int8", "w8a8"])
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--trees", default="2,2,1,1;3,2,1;2,1,1,1", help="semicolon-separated static trees")
    p.add_argument("--tree-acceptors", default="traversal,multistep", help="comma-separated tree acceptors")
    p.add_argument("--tree-children", default="sample,distinct", help="comma-separated sibling samplers")
    p.add_argument("--ks", default="5,6", help="comma-separated chain k to run beside (token-wise and block)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompt-set", default="prose")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--samples", type=int, default=16, help="acceptor re-runs per pass for the expected path length")
    p.add_argument("--random-prompts", action="store_true", help="random token prompts (models without tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="tree_gain")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=run)


def _configs(args) -> tuple[list[tuple[str, str, str]], list[int]]:
    from verispec.spec.tree import CHILDREN_MODES, parse_tree

    trees = [t.strip() for t in args.trees.split(";") if t.strip()]
    for t in trees:
        if t.startswith("dynamic:"):
            raise ValueError(f"--trees: {t!r}: static trees only (a dynamic tree drafts children 'top', so it "
                             "holds no chain draft to pair with)")
        parse_tree(t)  # a bad tree is named here, before any model loads
    acceptors = [a.strip() for a in args.tree_acceptors.split(",") if a.strip()]
    children = [c.strip() for c in args.tree_children.split(",") if c.strip()]
    bad = [c for c in children if c not in CHILDREN_MODES]
    if bad:
        raise ValueError(f"--tree-children: unknown {bad[0]!r} (use {', '.join(CHILDREN_MODES)})")
    ks = [int(k) for k in args.ks.split(",") if k.strip()] if args.ks.strip() else []
    if any(k < 2 for k in ks):
        raise ValueError(f"--ks: every chain k must be >= 2 (one draft at least), got {args.ks!r}")
    if not trees and not ks:
        raise ValueError("nothing to run: --trees and --ks are empty")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (at T = 0 every exact rule keeps the argmax path), got {args.temperature}")
    for name, v in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens), ("--samples", args.samples)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return [(t, a, c) for t in trees for a in acceptors for c in children], ks


def run(args) -> int:
    from verispec.spec import PairedBlockGain, SpeculativeGenerator
    from verispec.spec.resolve import make_acceptor, make_tree_acceptor
    from verispec.spec.tree_gain import PairedTreeGain

    configs, ks = _configs(args)
    from verispec.model import open_source
    from verispec.model.tokenizer import Tokenizer

    config, _, src = open_source(args.target, progress=True)
    prompts = (bench_prompts(args.prompt_set, args.prompts, None, config.vocab_size, args.seed) if args.random_prompts
               else bench_prompts(args.prompt_set, args.prompts, Tokenizer.from_pretrained(src)))
    n_positions = max(len(p) for p in prompts) + args.max_new_tokens + 32
    batch = len(prompts)
    target = _load(args.target, args, n_positions, batch)
    draft = _load(args.draft, args, n_positions, batch, args.draft_quant) if is_model_draft(args.draft) else args.draft
    seq_len = max(len(p) for p in prompts) + args.max_new_tokens
    rows, skipped = [], []
    for tree, acceptor, children in configs:
        try:
            probe = PairedTreeGain(make_tree_acceptor(acceptor), children, samples=args.samples, seed=args.seed)
            gen = SpeculativeGenerator(draft, target, None, acceptor=probe, tree=tree, children=children,
                                       measure_decode_step=False)
        except (ValueError, TypeError) as e:  # e.g. recursive with sampled children
            skipped.append({"tree": tree, "acceptor": acceptor, "children": children, "reason": str(e)})
            print(f"skipped tree {tree} {acceptor}/{children}: {e}")
            continue
        t0 = time.perf_counter()
        stats = gen.generate(prompts, seq_len, temperature=args.temperature, seed=args.seed).stats
        s = {"tree": tree, "acceptor": acceptor, "children": children, "wall_s": time.perf_counter() - t0,
             "new_tokens": stats.new_tokens, "mean_tokens_per_pass": stats.mean_tokens_per_pass, **probe.summary()}
        rows.append(s)
        print(f"tree {tree:<9} {acceptor}/{children:<8} tokens/pass {s.get('tree_tokens_per_pass', 0):.3f} "
              f"(realised {s.get('tree_tokens_per_pass_realised', 0):.3f}); over its first-child chain: "
              f"token-wise {_fmt(s.get('gain_over_token_wise_chain'))} +- {_fmt(s.get('gain_over_token_wise_chain_se'))}, "
              f"block {_fmt(s.get('gain_over_block_chain'))} +- {_fmt(s.get('gain_over_block_chain_se'))}")
    chains = []
    for k in ks:
        probe = PairedBlockGain(make_acceptor("default", target))
        gen = SpeculativeGenerator(draft, target, k, acceptor=probe, measure_decode_step=False)
        t0 = time.perf_counter()
        stats = gen.generate(prompts, seq_len, temperature=args.temperature, seed=args.seed).stats
        per_g = probe.summary()
        n = sum(v["row_passes"] for v in per_g.values())
        chain = {"k": k, "wall_s": time.perf_counter() - t0, "new_tokens": stats.new_tokens,
                 "mean_tokens_per_pass": stats.mean_tokens_per_pass, "row_passes_with_drafts": n,
                 "token_wise_tokens_per_pass": sum(v["row_passes"] * v["token_wise_tokens_per_pass"]
                                                   for v in per_g.values()) / n if n else None,
                 "block_tokens_per_pass": sum(v["row_passes"] * v["block_tokens_per_pass"]
                                              for v in per_g.values()) / n if n else None,
                 "by_drafts": per_g}
        chains.append(chain)
        print(f"chain k={k}: expected tokens/pass token-wise {_fmt(chain['token_wise_tokens_per_pass'])}, "
              f"block {_fmt(chain['block_tokens_per_pass'])} (realised {stats.mean_tokens_per_pass:.3f})")
    best_chain = max((max(c["token_wise_tokens_per_pass"] or 0, c["block_tokens_per_pass"] or 0) for c in chains),
                     default=None)
    for r in rows:
        r["over_best_chain_run"] = r["tree_tokens_per_pass"] / best_chain if best_chain and r.get("row_passes") else None
    data = {"benchmark": "tree-gain", "command": "verispec " + " ".join(shlex.quote(a) for a in getattr(args, "argv", [])),
            "machine": machine_info(), "target": args.target, "draft": args.draft, "draft_quant": args.draft_quant,
            "amp": args.amp, "temperature": args.temperature, "prompt_set": args.prompt_set, "prompts": batch,
            "max_new_tokens": args.max_new_tokens, "samples": args.samples, "seed": args.seed, "method": METHOD,
            "trees": rows, "skipped": skipped, "chains": chains, "best_chain_tokens_per_pass": best_chain}
    path = write_json(args.name, data, args.out_dir)
    _plot(data, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def _load(name, args, n_positions: int, batch: int, quant: str | None = None):
    from verispec.model import LlamaForSampling

    return LlamaForSampling.from_pretrained(name, n_positions=n_positions, batch_size=batch, amp=args.amp,
                                            kernel_backend=args.kernel_backend, device=args.device, progress=True,
                                            quant=quant)


def _fmt(v, f="{:.3f}") -> str:
    return "-" if v is None else f.format(v)


def _plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = [r for r in data["trees"] if r.get("row_passes")]
    labels = [f"{r['tree']}\n{r['acceptor']}/{r['children']}" for r in trees] + [f"chain k={c['k']}" for c in data["chains"]]
    tree_vals = [r["tree_tokens_per_pass"] for r in trees] + [c["block_tokens_per_pass"] or 0 for c in data["chains"]]
    paired_t = [r.get("chain_token_wise_tokens_per_pass") or 0 for r in trees] + \
        [c["token_wise_tokens_per_pass"] or 0 for c in data["chains"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], tree_vals, width=0.4, label="tree (expected) / chain block")
    ax.bar([i + 0.2 for i in x], paired_t, width=0.4, label="first-child chain token-wise / chain token-wise")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("tokens per verify pass")
    ax.set_title(f"{data['target']} / {data['draft']} {data['draft_quant'] or ''}, {data['prompt_set']}, "
                 f"T={data['temperature']:g}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
