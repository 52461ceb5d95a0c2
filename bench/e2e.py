"""``verispec bench e2e``: end-to-end tokens/s of verispec target-only decoding, speculative
decoding for each k and k="auto", and Hugging Face transformers' ``generate()`` target-only and
assisted, on the same weights, dtype, prompts and number of new tokens. The one end-to-end
benchmark: ``--no-hf --no-auto`` gives the plain acceptance and speedup table of a draft/target
pair per k and temperature.

Per prompt set x temperature it records per-prompt and aggregate tokens/s, acceptance, tokens
per pass, speedups over target-only, measured and predicted (Leviathan's formula with the
acceptance and costs of the run), k="auto" against the best and the median fixed k (measured,
and priced at the cell's pooled pass costs), per-position acceptance, target-only's weight
bandwidth against a bandwidth measured in the run, and at temperature 0 whether speculative
output equals target-only output token for token.

Verification cells: ``--chain-acceptors default,block`` runs each fixed k under token-wise
rejection sampling and block verification; ``--trees "2,2,1,1;3,2,1;dynamic:8;dynamic:16"`` runs
each token tree under every (``--tree-acceptors``, ``--tree-children``) combination the generator
accepts (refused ones are listed per cell under "skipped"; at T=0 each tree runs once, multistep
with children top); ``--auto-tree`` adds k="auto", tree="auto". All interleaved like the rest.
Each path records tokens per pass, nodes per pass, tokens/s, verify seconds per pass by tokens
scored, and ``predicted_speedup_flat64`` (its tokens per pass on an accelerator-like flat verify
curve, spec/simulate.py); each cell's summary compares the best token-wise chain, block chain and
tree (``summary.verification``).

Writes NAME.json, NAME_tokens_per_s.png, NAME_speedup.png, NAME_acceptance.png and
NAME_flat64.png in --out-dir ($VERISPEC_RESULTS or ./bench-results by default) and prints a
table. How each figure is timed is in the JSON under "method".
"""

from __future__ import annotations

import argparse
import shlex
import time

import torch

from .common import (
    bench_prompts,
    greedy_divergence,
    is_model_draft,
    load_model,
    measure_memory_bandwidth,
    weight_bytes,
    write_json,
)
from .e2e_plan import (accepted_paths, check_args, make_generator, path_policy, path_specs, positions_needed,
                       shared_policies, spec_label)
from .e2e_steps import fork, run_steps, speculative_stepper, target_only_stepper
from .e2e_plots import plot_acceptance, plot_flat64, plot_speedup, plot_tokens_per_s
from .e2e_report import (add_bandwidth, add_flat64, add_predicted, add_priced, add_repeats, add_speedups, method,
                         print_report, summarize)

WARMUP_TOKENS = 8  # new tokens of the untimed warm-up run of each path


def register(sub) -> None:
    p = sub.add_parser("e2e", help="end-to-end tokens/s: target-only, speculative per k and auto, HF transformers; "
                       "acceptance, measured and predicted speedup")
    p.add_argument("--target", default="qwen2.5-coder-1.5b", help="model name, HF directory or .gguf file")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="model name/path, 'self:N' or 'ngram'")
    p.add_argument("--draft-quant", default=None, choices=["int8", "w8a8"],
                   help="store our draft's weights as int8 (the HF assisted baseline keeps --amp)")
    p.add_argument("--ks", default="2,3,4,5,6,7,8", help="comma-separated fixed k values (each >= 2)")
    p.add_argument("--auto", action=argparse.BooleanOptionalAction, default=True, help="also run k='auto'")
    p.add_argument("--temperatures", default="0,0.7", help="comma-separated temperatures (0 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (EOS does not stop)")
    p.add_argument("--prompt-sets", default="code,prose", help="comma-separated prompt sets of bench/prompts.json")
    p.add_argument("--prompts", type=int, default=4, help="prompts per set")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole prompt set this many times (paths interleaved throughout); the JSON keeps "
                        "each repeat's tokens/s, so k=auto against the best fixed k comes with its run-to-run spread")
    p.add_argument("--interleave", default="step", choices=["step", "prompt"],
                   help="step: verispec's paths decode each prompt together, one step of each in turn, so the "
                        "machine's drift touches them alike (transformers runs whole); prompt: each path runs "
                        "the whole prompt in turn (see bench/e2e_steps.py)")
    p.add_argument("--random-prompts", action="store_true", help="random token prompts (models without tokenizer)")
    p.add_argument("--amp", default="bf16", choices=["f32", "bf16", "f16"], help="dtype of both engines")
    p.add_argument("--target-amx", action="store_true",
                   help="the target's bf16 products on AMX tiles (amx=True): every target path, target-only too")
    p.add_argument("--draft-amx", action="store_true", help="the draft model's bf16 products on AMX tiles")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default=None)
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers generate() (target-only and assisted)")
    p.add_argument("--hf-dir", default=None, help="where converted HF directories are cached "
                   "(default $VERISPEC_HOME/hf-converted or ~/.cache/verispec/hf-converted); converted only if missing")
    p.add_argument("--acceptor", default="default", choices=["default", "coupled", "sample-match"],
                   help="verispec's token acceptor (lossless ones): default = rejection sampling; coupled = "
                        "position-keyed race noise, so at T > 0 target-only (sampling on the same noise), "
                        "every k and k=auto emit the same text (the JSON records each path's divergence)")
    p.add_argument("--chain-acceptors", default=None,
                   help="comma-separated chain acceptors; each fixed k of --ks runs under each (default: --acceptor "
                        "alone): default (token-wise rejection sampling), block (block verification), coupled, "
                        "sample-match. k=auto runs under --acceptor")
    p.add_argument("--trees", default="",
                   help="semicolon-separated token trees, each a path per acceptor and children mode of "
                        "--tree-acceptors x --tree-children that the generator accepts (the rest are skipped and "
                        "listed): static branchings '2,2,1,1' or dynamic trees 'dynamic:N' (depth --tree-depth-k - "
                        "1, children top only); at T=0 each tree runs once (multistep, children top: every exact "
                        "acceptor decides the same there). Default: none")
    p.add_argument("--tree-acceptors", default="multistep,recursive,traversal",
                   help="comma-separated tree acceptors for --trees at T > 0")
    p.add_argument("--tree-children", default="sample,distinct,top",
                   help="comma-separated sibling draws for --trees at T > 0 (sample, distinct, top)")
    p.add_argument("--tree-depth-k", type=int, default=5, help="k of dynamic trees (depth k - 1), >= 2")
    p.add_argument("--auto-tree", action=argparse.BooleanOptionalAction, default=False,
                   help="also run k='auto', tree='auto' (a policy choosing a chain length or a tree each step), "
                        "where the generator accepts it (else it is listed as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help="buffer size of the bandwidth measurement")
    p.add_argument("--name", default="e2e", help="results file stem")
    p.add_argument("--out-dir", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


# ---- the timed paths ------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _target_only_runner(target, new_tokens, temperature, seed, device, by_step=False, coupled=False):
    target = fork(target) if by_step else target

    def one(i, p):
        _sync(device)
        t0 = time.perf_counter()
        out = target.sample(p[None], len(p) + new_tokens, temperature=temperature, seed=seed + i,
                            coupled=coupled)  # [1, L + N]
        _sync(device)
        wall = time.perf_counter() - t0
        s = target.last_stats
        return out[0], _prompt_row(len(p), s["new_tokens"], wall, s["prefill_s"], s["decode_s"]), None

    def result(rows, stats):
        return {"engine": "verispec", "mode": "target-only", "k": None, **_aggregate(rows)}

    return one, result, target_only_stepper(target, new_tokens, temperature, seed, _prompt_row, coupled)


def _speculative_runner(draft, target, spec, new_tokens, temperature, seed, device, policies, by_step=False):
    from .e2e_steps import counted_stream

    if by_step:  # this path's own KV caches, so the paths can take turns step by step
        draft, target = fork(draft), fork(target)
    # no in-run decode-step probe: its two extra target forwards would be timed in wall_s.
    # k=auto uses the one AdaptiveK of the whole run (as a long-lived engine would): its one-off cost
    # calibration ran in the warm-up; the time it took is reported beside the results
    gen = make_generator(draft, target, spec, temperature, path_policy(spec, policies), probe=temperature > 0)
    from verispec.spec import PairedBlockGain

    probe = gen.acceptor.summary if isinstance(gen.acceptor, PairedBlockGain) else None  # chains at T > 0

    def one(i, p):
        toks, counts = [], {}
        _sync(device)
        t0 = time.perf_counter()
        for step in counted_stream(gen, gen.stream(p[None], len(p) + new_tokens, temperature=temperature,
                                                   seed=seed + i), counts):
            for row_tokens in step.per_row().values():
                toks.extend(row_tokens)
        _sync(device)
        wall = time.perf_counter() - t0
        s = gen.last_stats
        # a k-policy's calibration, if one ran inside the call, is charged to its decode time
        row = _prompt_row(len(p), s.new_tokens, wall, s.prefill_s, s.decode_s + s.calibration_s)
        row.update(calibration_s=s.calibration_s, acceptance_rate=s.acceptance_rate, k_counts=dict(s.k_counts),
                   verify_passes_by_tokens=dict(sorted(counts.items())))
        return torch.cat([p, torch.tensor(toks, dtype=torch.long)]), row, s

    def result(rows, stats):
        return {"engine": "verispec", "mode": "speculative", "k": spec["k"], "label": spec_label(spec),
                "verify": "chain" if spec["tree"] is None else "tree", "acceptor": spec["acceptor"],
                "acceptor_name": stats[0].acceptor, "tree": stats[0].tree or spec["tree"], "children": spec["children"], **_aggregate(rows),
                **_acceptance(stats, rows), "calibration_s": sum(s.calibration_s for s in stats),
                "policy": stats[0].policy, **({"paired_block_gain": probe()} if probe else {})}

    return one, result, speculative_stepper(gen, new_tokens, temperature, seed, _prompt_row)


def _hf_runner(hf_target, hf_draft, new_tokens, temperature, seed):
    from .e2e_hf import hf_generate

    def one(i, p):
        r = hf_generate(hf_target, p, new_tokens, temperature, seed + i, assistant=hf_draft)
        return r["tokens"], _prompt_row(len(p), r["new_tokens"], r["wall_s"], None, None), None

    mode = "target-only" if hf_draft is None else "assisted"
    return one, lambda rows, stats: {"engine": "transformers", "mode": mode, "k": None, **_aggregate(rows)}


def run_interleaved(runners: list, prompts: list, by_step: bool = False, sync=lambda: None) -> list[tuple[list, dict]]:
    """Run every path on every prompt, prompt-major (prompt 1 through all paths, then prompt 2, ...)
    so that a drift of the machine's speed during the run touches every path alike, the order of
    the paths rotated by one from each prompt to the next (no path always runs first, or right
    after transformers); return (outputs, path dict) per runner, in the runners' order.

    A runner is ``(one, result)`` or ``(one, result, stepper)``. With ``by_step``, the runners that
    have a stepper decode each prompt together, one step of each in turn (bench/e2e_steps.py), at
    the place of the first of them in the prompt's order; the others run whole."""
    outs = [[] for _ in runners]
    rows = [[] for _ in runners]
    stats = [[] for _ in runners]
    n = len(runners)

    def keep(j, out, row, st):
        outs[j].append(out)
        rows[j].append(row)
        if st is not None:
            stats[j].append(st)

    for i, p in enumerate(prompts):
        order = [(i + r) % n for r in range(n)]
        stepped = [j for j in order if by_step and len(runners[j]) > 2]
        for j in order:
            if j not in stepped:
                keep(j, *runners[j][0](i, p))
            elif j == stepped[0]:
                for js, res in sorted(run_steps(i, p, {js: runners[js][2] for js in stepped}, sync).items()):
                    keep(js, *res)
    return [(outs[j], runner[1](rows[j], stats[j])) for j, runner in enumerate(runners)]


def _prompt_row(prompt_tokens, new, wall, prefill_s, decode_s) -> dict:
    return {"prompt_tokens": prompt_tokens, "new_tokens": new, "wall_s": wall, "prefill_s": prefill_s,
            "decode_s": decode_s, "e2e_tokens_per_s": new / wall,
            "tokens_per_s": new / decode_s if decode_s else None}


def _aggregate(per_prompt: list[dict]) -> dict:
    new = sum(r["new_tokens"] for r in per_prompt)
    wall = sum(r["wall_s"] for r in per_prompt)
    decode = None if any(r["decode_s"] is None for r in per_prompt) else sum(r["decode_s"] for r in per_prompt)
    return {"new_tokens": new, "wall_s": wall, "decode_s": decode, "e2e_tokens_per_s": new / wall,
            "tokens_per_s": new / decode if decode else None, "per_prompt": per_prompt}


def _acceptance(stats: list, rows: list | None = None) -> dict:
    """Acceptance over all prompts (counts summed, then divided: not a mean of ratios), the pass
    costs the priced reading needs (seconds and counts summed), and for token trees nodes per pass
    and acceptance per sibling rank. ``verify_passes_by_tokens`` (from the rows) counts the passes
    by tokens scored (a chain pass: k; a tree pass: nodes + 1)."""
    accepted = sum(s.accepted_drafts for s in stats)
    proposed = sum(s.proposed_drafts for s in stats)
    passes = sum(s.row_passes for s in stats)
    width = max(len(s.reached) for s in stats)
    reached, kept, k_counts, target_s_by_k = [0] * width, [0] * width, {}, {}
    for s in stats:
        for i, (r, k) in enumerate(zip(s.reached, s.kept)):
            reached[i] += r
            kept[i] += k
        for k, n in s.k_counts.items():
            k_counts[k] = k_counts.get(k, 0) + n
        for k, sec in s.target_s_by_k.items():  # (a tree pass: keyed by nodes + 1, not by its k_counts key)
            target_s_by_k[k] = target_s_by_k.get(k, 0.0) + sec
    out = {"acceptance_rate": accepted / proposed if proposed else None,
           "mean_tokens_per_pass": (accepted + passes) / passes if passes else None,
           "position_acceptance": [k / r if r else None for k, r in zip(kept, reached)],
           "k_counts": dict(sorted(k_counts.items())), "accepted_drafts": accepted, "proposed_drafts": proposed,
           "pass_costs": {"steps": sum(s.steps for s in stats), "drafted_positions": sum(s.drafted_positions for s in stats),
                          "draft_s": sum(s.draft_s for s in stats), "target_s": sum(s.target_s for s in stats),
                          "target_s_by_k": dict(sorted(target_s_by_k.items()))}}
    tree_passes = sum(s.tree_passes for s in stats)
    out["nodes_per_pass"] = sum(s.tree_nodes for s in stats) / tree_passes if tree_passes else None
    if tree_passes:
        depth = max(len(s.rank_tried) for s in stats)
        tried = [[0] * max([len(s.rank_tried[d]) for s in stats if len(s.rank_tried) > d] or [0]) for d in range(depth)]
        got = [list(row) for row in tried]
        for s in stats:
            for d, (t_row, k_row) in enumerate(zip(s.rank_tried, s.rank_kept)):
                for r, (t, k) in enumerate(zip(t_row, k_row)):
                    tried[d][r] += t
                    got[d][r] += k
        out["rank_acceptance"] = [[k / t if t else None for k, t in zip(kr, tr)] for kr, tr in zip(got, tried)]
    if rows and all("verify_passes_by_tokens" in r for r in rows):
        counts = {}
        for r in rows:
            for t, n in r["verify_passes_by_tokens"].items():
                counts[t] = counts.get(t, 0) + n
        counts = dict(sorted(counts.items()))
        out["verify_passes_by_tokens"] = counts
        out["verify_s_per_pass_by_tokens"] = {t: target_s_by_k.get(t, 0.0) / n for t, n in counts.items() if n}
    return out


# ---- the run --------------------------------------------------------------------------------------


def _load_all(args, plan, sets):
    from verispec.model import open_source
    from verispec.model.tokenizer import Tokenizer

    config, _, src_path = open_source(args.target, progress=True)
    tok = None if args.random_prompts else Tokenizer.from_pretrained(src_path)
    prompts = {s: bench_prompts(s, args.prompts, tok, config.vocab_size if args.random_prompts else None, args.seed)
               for s in sets}
    n_positions = positions_needed(prompts, plan, args.max_new_tokens, config.max_position_embeddings)
    target = load_model(args.target, args, n_positions, amx=args.target_amx)
    draft = (load_model(args.draft, args, n_positions, quant=args.draft_quant, amx=args.draft_amx)
             if is_model_draft(args.draft) else args.draft)
    hf_target = hf_draft = None
    hf = {"ran": False, "note": "--no-hf"}
    if args.hf:
        from .e2e_hf import default_hf_root, ensure_hf_dir, hf_settings, load_hf

        root = args.hf_dir or default_hf_root()
        t_dir, t_new = ensure_hf_dir(args.target, args.amp, root)
        hf_target = load_hf(t_dir, args.amp, args.device)
        hf = {"ran": True, "target_dir": str(t_dir), "target_converted_now": t_new}
        if is_model_draft(args.draft):
            d_dir, d_new = ensure_hf_dir(args.draft, args.amp, root)
            hf_draft = load_hf(d_dir, args.amp, args.device)
            hf.update(draft_dir=str(d_dir), draft_converted_now=d_new)
        else:
            hf["note"] = f"assisted generation not run: draft {args.draft!r} is not a model transformers can load"
        hf.update(hf_settings(hf_target, hf_draft))
    return prompts, target, draft, hf_target, hf_draft, hf


def _warm_up(prompt, target, draft, specs, hf_target, hf_draft, args, policies) -> float:
    """One short untimed run of every kind of path (the first chain of each acceptor, k=auto, each
    tree once), so one-off costs (allocation, kernel selection, the adaptive policy's cost
    calibration) are not timed; returns the calibration seconds."""
    seq = len(prompt) + WARMUP_TOKENS
    target.sample(prompt[None], seq, temperature=0)
    calibration_s = 0.0
    kinds = {}
    for spec in specs:  # first of each kind
        kind = (spec["k"] == "auto", spec["acceptor"]) if spec["tree"] is None else (spec["tree"],)
        kinds.setdefault(kind, spec)
    for spec in kinds.values():
        gen = make_generator(draft, target, spec, 0.0, path_policy(spec, policies))
        calibration_s += gen.generate(prompt[None], seq, temperature=0).stats.calibration_s
    if hf_target is not None:
        from .e2e_hf import hf_generate

        for assistant in [None] + ([hf_draft] if hf_draft is not None else []):
            hf_generate(hf_target, prompt, WARMUP_TOKENS, 0.0, args.seed, assistant=assistant)
    return calibration_s


def run(args) -> int:
    plan, temps, sets = check_args(args)
    prompts, target, draft, hf_target, hf_draft, hf = _load_all(args, plan, sets)
    bandwidth = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_bytes)
    target_weight_bytes = weight_bytes(target)
    policies = shared_policies(plan)
    cells = {t: accepted_paths(draft, target, path_specs(plan, t), t) for t in temps}  # (run, skipped) per temperature
    if not any(ok for ok, _ in cells.values()):
        raise ValueError("nothing speculative to run: the generator refuses every path asked for: "
                         + "; ".join(f"{x['label']}: {x['reason']}" for _, sk in cells.values() for x in sk))
    warm = [sp for ok, _ in cells.values() for sp in ok]
    warmup_calibration_s = _warm_up(prompts[sets[0]][0], target, draft, warm, hf_target, hf_draft, args, policies)

    runs = []
    N = args.max_new_tokens
    hf_assistants = [] if hf_target is None else [None] + ([hf_draft] if hf_draft is not None else [])
    for set_name in sets:
        ps = prompts[set_name] * args.repeats  # prompt i of repeat r is sampled with seed + r * prompts + i
        for temp in temps:
            by_step = args.interleave == "step"
            specs, skipped = cells[temp]
            runners = [_target_only_runner(target, N, temp, args.seed, args.device, by_step, args.acceptor == "coupled")]
            runners += [_speculative_runner(draft, target, spec, N, temp, args.seed, args.device, policies, by_step)
                        for spec in specs]
            runners += [_hf_runner(hf_target, assistant, N, temp, args.seed) for assistant in hf_assistants]
            done = run_interleaved(runners, ps, by_step, sync=lambda: _sync(args.device))
            ref_outs = done[0][0]
            paths = [path for _, path in done]
            for outs, path in done[1:]:
                if temp == 0 and path["engine"] == "verispec":
                    path["greedy_divergence"] = greedy_divergence(outs, ref_outs, ps)
                elif temp == 0:  # same weights, same greedy rule: a check that the comparison is like for like
                    path["greedy_divergence_from_verispec_target_only"] = greedy_divergence(outs, ref_outs, ps)
                if temp > 0 and args.acceptor == "coupled" and path.get("acceptor") == "coupled":
                    # one seed, one text: every coupled speculative path should emit target-only's coupled tokens
                    path["coupled_divergence"] = greedy_divergence(outs, ref_outs, ps)
            add_speedups(paths)
            add_predicted(paths)
            add_flat64(paths)
            add_bandwidth(paths, target_weight_bytes, bandwidth["read_GBps"])
            add_repeats(paths, args.repeats)
            add_priced(paths)
            runs.append({"prompt_set": set_name, "temperature": temp, "prompts": len(ps) // args.repeats,
                         "repeats": args.repeats, "paths": paths, "skipped": skipped,
                         "summary": summarize(paths, args.acceptor)})
            if "auto" in policies:  # what k=auto believed at the end of the cell (it carries on to the next)
                runs[-1]["auto_policy_state"] = policies["auto"].state()
            if "auto-tree" in policies and hasattr(policies["auto-tree"], "state"):
                runs[-1]["auto_tree_policy_state"] = policies["auto-tree"].state()

    data = {
        "command": "verispec " + " ".join(shlex.quote(a) for a in getattr(args, "argv", [])),
        "target": str(args.target), "draft": str(args.draft), "draft_quant": args.draft_quant, "amp": args.amp, "device": args.device,
        "target_amx": args.target_amx, "draft_amx": args.draft_amx,
        "acceptor": args.acceptor, "max_new_tokens": N, "prompt_sets": sets, "random_prompts": args.random_prompts, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "target_weight_bytes": target_weight_bytes,
        "memory_bandwidth": bandwidth, "method": method(args.interleave), "interleave": args.interleave, "hf": hf, "runs": runs,
        "auto_calibration_s_in_warmup": warmup_calibration_s,
        "verification": {k: v for k, v in plan.items() if k not in ("ks", "auto", "acceptor")},
    }
    path = write_json(args.name, data, args.out_dir)
    pngs = [plot_tokens_per_s(runs, args, data), plot_speedup(runs, args, data), plot_acceptance(runs, args),
            plot_flat64(runs, args, data)]
    print_report(data, [path, *pngs])
    return 0
