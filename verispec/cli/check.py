"""``verispec check``: test an acceptor / draft provider for exactness on toy Markov chains.

Runs the real speculative loop on many identical prompts in one batch and compares the joint
distribution of the next L tokens with the exact target-only one (exit status 1 on FAIL).
"""

from __future__ import annotations

import argparse


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt takes comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt needs at least one token id")
    return ids


def _branching(text: str) -> list[int]:  # in run(): a bad value is a one-line error, not argparse's usage
    try:
        branching = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--tree takes comma-separated children per level, e.g. 2,2; got {text!r}") from None
    if not branching or any(b < 1 for b in branching):
        raise ValueError(f"--tree needs positive children counts per level, e.g. 2,2; got {text!r}")
    return branching


def register(sub) -> None:
    p = sub.add_parser(
        "check",
        help="test an acceptor or draft provider for exactness (chi-square against the exact distribution)",
        description="Run the speculative loop on toy Markov chains and test its output distribution against "
        "the exact target-only one. Acceptors: default, greedy, sample-match, coupled, typical (lossy), "
        "shared-uniform (deliberately biased) or module:attr. Drafts: model (a second random chain), ngram, "
        "ngram:N, self:N, argmax-softq (deliberately biased) or module:attr. With --tree, a tree acceptor "
        "(multistep, greedy or module:attr) runs one token-tree pass per row on the toy chains, without the "
        "generator, and the path plus emitted token (continued by target sampling) is tested.",
    )
    p.add_argument("--acceptor", default="default", help="acceptor name or module:attr")
    p.add_argument("--k", type=int, default=4, help="tokens scored per verify pass (draft proposes k-1)")
    p.add_argument("--draft", default="model", help="draft: model, ngram, ngram:N, self:N, argmax-softq, module:attr")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with probability >= P (default: off)")
    p.add_argument("--samples", type=int, default=100_000, help="rows in the batch (identical prompts)")
    p.add_argument("--length", type=int, default=4, help="continuation length L (V^L outcomes are enumerated)")
    p.add_argument("--vocab", type=int, default=6, help="toy vocabulary size V")
    p.add_argument("--order", type=int, default=1, choices=[1, 2], help="Markov order of the toy chains")
    p.add_argument("--prompt", action="append", type=_ids, default=None,
                   help="comma-separated prompt token ids; repeat for several prompts (default: 0)")
    p.add_argument("--eos", type=int, default=None, help="EOS token id (rows stop there) (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run and (unless --chain-seed) of the chains")
    p.add_argument("--chain-seed", type=int, default=None, help="seed of the toy chains (default: --seed)")
    p.add_argument("--statistic", choices=["chi2", "g"], default="chi2",
                   help="goodness-of-fit statistic: Pearson's chi-square or the G-test")
    p.add_argument("--threshold", type=float, default=1e-6, help="FAIL when the p-value is below this")
    p.add_argument("--tree", default=None,
                   help="check a tree acceptor on a tree of these children per level, e.g. 2,2 (L = depth + 1; "
                   "--k, --draft, --top-k, --top-p, --length, --order, --prompt, --eos do not apply)")
    p.add_argument("--loop", action="store_true",
                   help="with --tree: run the whole speculative loop with trees (SpeculativeGenerator(tree=...)) "
                        "on the toy chains, so --draft, --k (a dynamic tree's depth k - 1; auto's MAX), --top-k, "
                        "--top-p, --length, --order, --prompt and --eos apply; --tree also takes dynamic:N and auto")
    p.add_argument("--children", choices=["sample", "distinct", "top"], default="sample",
                   help="with --tree: siblings i.i.d. from q, without replacement, or the likeliest under q")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from verispec.spec.checker import check_exactness, check_tree_exactness

    if args.tree is not None and args.loop:
        tree = args.tree if args.tree == "auto" or args.tree.startswith("dynamic:") else _branching(args.tree)
        k = f"auto:{args.k}" if tree == "auto" else args.k if isinstance(tree, str) else None
        report = check_exactness(
            None if args.acceptor == "default" else args.acceptor, args.draft, k, tree=tree, children=args.children,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, samples=args.samples,
            length=args.length, vocab=args.vocab, order=args.order, prompts=args.prompt or [[0]], seed=args.seed,
            chain_seed=args.chain_seed, eos_token_id=args.eos, threshold=args.threshold, statistic=args.statistic,
        )
    elif args.tree is not None:
        report = check_tree_exactness(
            "multistep" if args.acceptor == "default" else args.acceptor, _branching(args.tree), args.children,
            temperature=args.temperature, samples=args.samples, vocab=args.vocab, seed=args.seed,
            chain_seed=args.chain_seed, threshold=args.threshold, statistic=args.statistic,
        )
    else:
        report = check_exactness(
            args.acceptor, args.draft, args.k, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            samples=args.samples, length=args.length, vocab=args.vocab, order=args.order,
            prompts=args.prompt or [[0]], seed=args.seed, chain_seed=args.chain_seed, eos_token_id=args.eos,
            threshold=args.threshold, statistic=args.statistic,
        )
    print(report.to_json() if args.json else report.format())
    return 0 if report.passed else 1
