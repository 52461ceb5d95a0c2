"""Speedups (measured and predicted), target-only's weight bandwidth, the k="auto" verdicts and the
printed table of ``verispec bench e2e`` (its plots: e2e_plots.py)."""

from __future__ import annotations

import random
import statistics

# How each figure of the e2e JSON is measured (written into the JSON as "method"; see method()).
METHOD = {
    "tokens_per_s": "verispec only: new tokens / seconds after prefill; used for speculative against verispec "
                    "target-only and for k=auto against fixed k. k=auto is one AdaptiveK for the whole run, as in a "
                    "long-lived engine: its one-off verify-cost calibration runs in the untimed warm-up "
                    "(auto_calibration_s_in_warmup); any later calibration would be counted in",
    "e2e_tokens_per_s": "every engine: new tokens / wall seconds of the whole generate call, prefill (target and "
                        "draft) included; used for every comparison with transformers and in the tokens/s plot",
    "aggregate": "per prompt set: new tokens and seconds summed over its prompts, then divided",
    "new_tokens": "EOS stopping disabled in both engines (verispec: no eos_token_id; transformers: "
                  "generation_config.eos_token_id=None), so each prompt makes max_new_tokens; the recorded counts "
                  "are the new tokens actually returned",
    "sampling": "greedy at temperature 0; otherwise pure temperature sampling in both engines (transformers: "
                "top_k=0, top_p=1.0, repetition_penalty=1.0)",
    "seeds": "prompt i uses seed+i; transformers draws from torch's global generator (seeded with seed+i before "
             "each call), so sampled texts of the two engines differ (same distribution, different draws)",
    "dtype": "verispec runs --amp; transformers loads the `verispec convert` output of the same model in that dtype",
    "threads": "one process: both engines run with the same torch thread count (torch_threads)",
    "warm_up": "one untimed short run of every path before timing",
    "batch": "1 (one prompt per call)",
    "speculative_probe": "SpeculativeGenerator(measure_decode_step=False): no extra target forwards inside the timing",
    "hf_assisted": "transformers' assisted generation with its default settings (see hf.assisted); with sampling "
                   "it runs its own speculative sampling",
    "predicted_speedup": "Leviathan et al.'s expected speedup over target-only, from the path's own acceptance "
                         "rate a and costs measured in the run, in units of target-only's decode seconds per token "
                         "(same cell): c = draft seconds per drafted position, r_k = verify seconds per pass at "
                         "k; sum over passes of (1 - a^k)/(1 - a) over sum of c(k-1) + r_k (for a fixed k: "
                         "Leviathan's formula). The loop's seconds outside draft and verify are not in it, so it "
                         "sits above the measured speedup by about their share. Token trees: the run's own tokens "
                         "per pass over c x drafted levels per pass + verify seconds per pass (the same units): "
                         "the tree's acceptance has no closed form here",
    "achieved_GBps": "target-only: target weight bytes x decode tokens/s (each token reads every weight once), "
                     "and that over the read bandwidth measured at the start of the run",
    "auto_vs_fixed": "k=auto against the best and the median fixed k, by tokens_per_s; within_3pct: auto >= 0.97 x best",
    "bootstrap": "how much of a verdict the cell's prompts support: 2000 resamples of its prompts (rows) with "
                 "replacement, the same rows for every path (paired: in a row every path decoded the same prompt at "
                 "the same time); per resample each path's summed tokens over summed seconds. auto_over_best_k_ci90: "
                 "5th-95th percentile of k=auto over the cell's best fixed k; auto_within_3pct_share: share of "
                 "resamples where k=auto >= 0.97 x the best fixed k of that resample (the maximum of noisy rates, "
                 "as a rerun would pick it)",
    "priced_tokens_per_s": "a second reading of the same runs, without the machine's drift between paths: each "
                           "speculative path's passes (its k counts and drafted positions, as run) priced at the "
                           "cell's pooled costs (verify seconds per pass at each k, draft seconds per drafted "
                           "position, other loop seconds per pass, each summed over every speculative path of the "
                           "cell and divided); new tokens / that. It keeps what a policy chose and what the texts "
                           "accepted and takes out the drift in the draft and loop costs; the verify cost at a k is "
                           "pooled over the passes at that k only (for a fixed k mostly its own), so part of the "
                           "drift stays. The measured tokens_per_s stays the headline. Chains only (every "
                           "chain acceptor pooled); token trees are not priced",
    "verification_cells": "--chain-acceptors: each fixed k runs under each chain acceptor (default: token-wise "
                          "rejection sampling; block: block verification); --trees: each tree under each (tree "
                          "acceptor, children) of --tree-acceptors x --tree-children the generator accepts (the "
                          "ones it refuses are listed per cell under 'skipped' with its reason); at T=0 each tree "
                          "runs once, multistep acceptor with children top, since at T=0 every exact acceptor "
                          "keeps the same path. Every path is interleaved with the others as the order says. Per "
                          "path: acceptor, tree, children, mean_tokens_per_pass (tokens committed per verify pass, "
                          "the block efficiency), nodes_per_pass (trees), tokens_per_s, verify_passes_by_tokens "
                          "and verify_s_per_pass_by_tokens (passes and verify seconds per pass by tokens scored in "
                          "the pass: k for a chain, nodes + 1 for a tree; counted per step from the generator's "
                          "per-size verify timer). k of a static tree path is its depth + 1, of a dynamic tree "
                          "--tree-depth-k",
    "verification_summary": "summary.verification per cell: best token-wise chain (every chain acceptor but "
                            "block), best block chain and best tree (auto excluded), each by tokens_per_s, by "
                            "mean_tokens_per_pass and by predicted_speedup_flat64; block_gain[k] = block tokens "
                            "per pass / token-wise tokens per pass at k (token-wise: the 'default' acceptor, else "
                            "the first token-wise one); tree_vs_best_chain = best tree tokens per pass / best "
                            "chain (token-wise or block) tokens per pass; tree_vs_same_depth_chain[tree path] = its "
                            "tokens per pass / the best chain's at k = depth + 1 (also on each tree path); "
                            "paired_block_gain (T > 0): every chain path's acceptor is wrapped in "
                            "PairedBlockGain, which adds at each verify pass the expected drafts block "
                            "verification and token-wise rejection sampling keep given that pass's drafts "
                            "(sum_i w_i and sum_i prod_{j<=i} min(1, p_j/q_j)); pooled over the cell's chain "
                            "passes per number of drafts g: both rules' expected tokens per pass and their "
                            "ratio (gain), free of the accept/reject noise and of the texts differing",
    "predicted_speedup_flat64": "what the path's measured tokens per pass would buy on an accelerator-like cost "
                                "curve: a verify pass costs one target decode step for up to 64 tokens scored "
                                "(flat; above 64: tokens/64 steps), and a drafted level costs c = the path's draft "
                                "seconds per drafted level (one draft forward, however wide the tree's level) "
                                "over target-only's decode seconds per token, both measured in this run on this "
                                "machine; levels = drafted levels per pass as run (k - 1 for a chain, the tree's "
                                "depth for a tree, fewer near the end of a sequence); predicted speedup = "
                                "tokens_per_pass / (c x levels + verify cost) "
                                "(verispec.spec.simulate.predicted_speedup_flat), and "
                                "predicted_tokens_per_s_flat64 = that x target-only's tokens_per_s. Assumes the "
                                "draft's cost per level and the target's decode step scale alike, the tree's "
                                "masks and the acceptor cost nothing, and no loop bookkeeping between passes; it "
                                "reads the acceptance as measured, so it predicts nothing about texts the run did "
                                "not decode",
}

ORDER = {
    "step": ("step-interleaved: for each prompt every verispec path decodes at once, one step (a verify pass, "
             "or one target-only token) of each in turn, the turn order rotated by one each round, each path on "
             "its own fork of the models (same weights, own KV cache); a path's seconds are the sum of its own "
             "steps' wall times (prefill: the engine's timer; after prefill: the rest), so a drift of the "
             "machine's speed within seconds touches every path alike. Transformers' generate() calls run "
             "whole, before or after the verispec group: the path order is rotated by one from each prompt to "
             "the next"),
    "prompt": ("prompt-major: each prompt runs through every path before the next prompt, so a drift of the "
               "machine's speed during the run touches all paths alike; the order of the paths is rotated by one "
               "from each prompt to the next; seconds after prefill from the engine's own timers "
               "(LlamaForSampling.last_stats['decode_s'], SpecStats.decode_s)"),
}


def method(interleave: str) -> dict:
    """METHOD with the path order (and timer) of ``--interleave``."""
    return {**METHOD, "order": ORDER[interleave]}


def _find(paths, engine, mode, k=None):
    for p in paths:
        if p["engine"] == engine and p["mode"] == mode and (k is None or p["k"] == k) and not p.get("tree"):
            return p
    return None


def _is_tree(p) -> bool:
    return p.get("verify") == "tree" or bool(p.get("tree"))


def _ratio(a, b):
    return a / b if a is not None and b else None


def add_speedups(paths: list[dict]) -> None:
    """Speedup fields on each path of one (prompt set, temperature)."""
    base = _find(paths, "verispec", "target-only")
    hf_target = _find(paths, "transformers", "target-only")
    hf_assisted = _find(paths, "transformers", "assisted")
    for p in paths:
        if p["engine"] == "verispec":
            p["speedup_vs_target_only"] = _ratio(p["tokens_per_s"], base["tokens_per_s"])
            p["e2e_speedup_vs_target_only"] = _ratio(p["e2e_tokens_per_s"], base["e2e_tokens_per_s"])
        for name, ref in (("hf_target_only", hf_target), ("hf_assisted", hf_assisted)):
            if ref is not None and ref is not p:
                p[f"e2e_speedup_vs_{name}"] = _ratio(p["e2e_tokens_per_s"], ref["e2e_tokens_per_s"])


def add_predicted(paths: list[dict]) -> None:
    """``c``, ``r_by_k`` and ``predicted_speedup`` on each speculative path of one cell (see METHOD)."""
    base = _find(paths, "verispec", "target-only")
    if not base or not base["decode_s"] or not base["new_tokens"]:
        return
    step_s = base["decode_s"] / base["new_tokens"]  # target-only seconds per token: the cost unit
    for p in paths:
        costs, a = p.get("pass_costs"), p.get("acceptance_rate")
        if p["mode"] != "speculative" or not costs or not costs["steps"] or a is None:
            continue
        c = costs["draft_s"] / costs["drafted_positions"] / step_s if costs["drafted_positions"] else 0.0
        if _is_tree(p):  # the run's own tokens per pass over its pass cost (see METHOD)
            cost = c * costs["drafted_positions"] / costs["steps"] + costs["target_s"] / costs["steps"] / step_s
            p.update(c=c, predicted_speedup=p["mean_tokens_per_pass"] / cost if cost and p.get("mean_tokens_per_pass")
                     else None)
            continue
        r = {k: costs["target_s_by_k"].get(k, 0.0) / n / step_s for k, n in p["k_counts"].items()}
        # expected tokens over cost, pooled over the passes as run (verispec.spec.stats.predicted_speedup at one k)
        tokens = sum(n * (float(k) if a >= 1.0 else (1.0 - a**k) / (1.0 - a)) for k, n in p["k_counts"].items())
        cost = sum(n * (c * (k - 1) + r[k]) for k, n in p["k_counts"].items())
        p.update(c=c, r_by_k=r, predicted_speedup=tokens / cost if cost else None)


def add_flat64(paths: list[dict], flat: int | None = None) -> None:
    """``predicted_speedup_flat64`` (and its inputs, predicted_tokens_per_s_flat64) on each
    speculative path of one cell (see METHOD)."""
    from verispec.spec.simulate import FLAT_TOKENS, flat_verify_cost, predicted_speedup_flat

    flat = flat or FLAT_TOKENS
    base = _find(paths, "verispec", "target-only")
    if not base or not base["decode_s"] or not base["new_tokens"]:
        return
    step_s = base["decode_s"] / base["new_tokens"]
    for p in paths:
        costs, tpp = p.get("pass_costs"), p.get("mean_tokens_per_pass")
        if p["mode"] != "speculative" or not costs or not costs["steps"] or tpp is None:
            continue
        c = costs["draft_s"] / costs["drafted_positions"] / step_s if costs["drafted_positions"] else 0.0
        levels = costs["drafted_positions"] / costs["steps"]
        passes = p.get("verify_passes_by_tokens") or ({} if _is_tree(p) else p["k_counts"])
        total = sum(passes.values())
        verify = sum(n * flat_verify_cost(int(t), flat) for t, n in passes.items()) / total if total else 1.0
        speedup = predicted_speedup_flat(tpp, c, levels, verify)
        p.update(c_per_level=c, levels_per_pass=levels, flat64_verify_cost=verify, predicted_speedup_flat64=speedup,
                 predicted_tokens_per_s_flat64=speedup * base["tokens_per_s"] if base["tokens_per_s"] else None)


def add_bandwidth(paths: list[dict], weight_bytes: int, read_GBps: float) -> None:
    """Target-only's achieved weight bandwidth and its share of the measured read bandwidth."""
    base = _find(paths, "verispec", "target-only")
    if base and base["tokens_per_s"]:
        base["achieved_GBps"] = weight_bytes * base["tokens_per_s"] / 1e9
        base["fraction_of_read_bandwidth"] = base["achieved_GBps"] / read_GBps if read_GBps else None


def add_repeats(paths: list[dict], repeats: int) -> None:
    """Each path's decode tokens/s in each repeat of the prompt set (its per-prompt rows are
    repeat-major: the prompts of repeat 0, then of repeat 1, ...)."""
    for p in paths:
        rows = p["per_prompt"]
        n = len(rows) // repeats
        chunks = [rows[r * n:(r + 1) * n] for r in range(repeats)]
        p["tokens_per_s_per_repeat"] = [
            None if any(x["decode_s"] is None for x in c) else sum(x["new_tokens"] for x in c) / sum(x["decode_s"] for x in c)
            for c in chunks]


def add_priced(paths: list[dict]) -> None:
    """``priced_tokens_per_s`` on each speculative path of one cell (see METHOD)."""
    spec = [p for p in paths if p["mode"] == "speculative" and p.get("pass_costs") and p["pass_costs"]["steps"]
            and not _is_tree(p)]
    if not spec:
        return
    count, verify = {}, {}
    for p in spec:
        for k, n in p["k_counts"].items():
            count[k] = count.get(k, 0) + n
            verify[k] = verify.get(k, 0.0) + p["pass_costs"]["target_s_by_k"].get(k, 0.0)
    positions = sum(p["pass_costs"]["drafted_positions"] for p in spec)
    draft = sum(p["pass_costs"]["draft_s"] for p in spec) / positions if positions else 0.0
    rest = sum(p["decode_s"] - p["pass_costs"]["draft_s"] - p["pass_costs"]["target_s"] for p in spec) \
        / sum(p["pass_costs"]["steps"] for p in spec)
    for p in spec:
        c = p["pass_costs"]
        seconds = sum(n * verify[k] / count[k] for k, n in p["k_counts"].items()) \
            + c["drafted_positions"] * draft + c["steps"] * rest
        p["priced_tokens_per_s"] = p["new_tokens"] / seconds


def _priced_verdict(fixed: list[dict], auto: dict) -> dict:
    """k=auto against the best and median fixed k by priced_tokens_per_s."""
    if auto.get("priced_tokens_per_s") is None or any(p.get("priced_tokens_per_s") is None for p in fixed):
        return {}
    best = max(fixed, key=lambda p: p["priced_tokens_per_s"])
    ratio = auto["priced_tokens_per_s"] / best["priced_tokens_per_s"]
    return {"priced_best_fixed_k": best["k"], "priced_auto_over_best": ratio, "priced_auto_within_3pct": ratio >= 0.97,
            "priced_auto_beats_median": auto["priced_tokens_per_s"] > statistics.median(p["priced_tokens_per_s"] for p in fixed)}


def _per_repeat(fixed: list[dict], auto: dict) -> dict:
    """k=auto against the best and the median fixed k of the same repeat."""
    reps = range(len(auto.get("tokens_per_s_per_repeat", [])))
    best = [max(p["tokens_per_s_per_repeat"][r] for p in fixed) for r in reps]
    median = [statistics.median(p["tokens_per_s_per_repeat"][r] for p in fixed) for r in reps]
    ratio = [auto["tokens_per_s_per_repeat"][r] / best[r] for r in reps]
    return {"auto_over_best_per_repeat": ratio,
            "auto_within_3pct_repeats": sum(x >= 0.97 for x in ratio),
            "auto_beats_median_repeats": sum(auto["tokens_per_s_per_repeat"][r] > median[r] for r in reps)}


def _bootstrap(fixed: list[dict], auto: dict, best: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired resamples of the cell's prompt rows (see METHOD["bootstrap"])."""
    rows = [[(r["new_tokens"], r["decode_s"]) for r in p["per_prompt"]] for p in [auto, best, *fixed]]
    n = len(rows[0])
    if n < 2 or any(len(r) != n or any(s is None or s <= 0 for _, s in r) for r in rows):
        return {}
    rng = random.Random(seed)
    over_best, within = [], 0
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        rate = [sum(r[i][0] for i in pick) / sum(r[i][1] for i in pick) for r in rows]
        over_best.append(rate[0] / rate[1])
        within += rate[0] >= 0.97 * max(rate[2:])
    q = statistics.quantiles(over_best, n=20, method="inclusive")
    return {"auto_over_best_k_ci90": [q[0], q[-1]], "auto_within_3pct_share": within / resamples}


def _best(paths: list[dict], key: str):
    got = [p for p in paths if p.get(key) is not None]
    if not got:
        return None
    p = max(got, key=lambda p: p[key])
    return {"label": p.get("label"), "k": p["k"], key: p[key]}


def pool_paired(paths: list[dict]) -> dict | None:
    """Every chain path's PairedBlockGain sums of a cell pooled per number of drafts g (row-pass
    weighted): block and token-wise expected tokens per pass from the same drafts, and the gain."""
    pooled = {}
    for p in paths:
        for g, v in p["paired_block_gain"].items():
            n, b, t = pooled.get(g, (0, 0.0, 0.0))
            m = v["row_passes"]
            pooled[g] = (n + m, b + m * v["block_tokens_per_pass"], t + m * v["token_wise_tokens_per_pass"])
    if not pooled:
        return None
    out = {g: {"row_passes": n, "block_tokens_per_pass": b / n, "token_wise_tokens_per_pass": t / n, "gain": b / t}
           for g, (n, b, t) in sorted(pooled.items(), key=lambda kv: int(kv[0]))}
    n = sum(v[0] for v in pooled.values())
    out["all"] = {"row_passes": n, "gain": sum(v[1] for v in pooled.values()) / sum(v[2] for v in pooled.values())}
    return out


def compare_verification(paths: list[dict]) -> dict:
    """Token-wise chains, block chains and trees of one cell (see METHOD["verification_summary"]);
    sets ``tree_vs_same_depth_chain`` on each tree path."""
    spec = [p for p in paths if p["mode"] == "speculative" and p["k"] != "auto"]
    chains = [p for p in spec if not _is_tree(p)]
    groups = {"token_wise": [p for p in chains if p.get("acceptor") != "block"],
              "block": [p for p in chains if p.get("acceptor") == "block"],
              "tree": [p for p in spec if _is_tree(p)]}
    out = {f"best_{name}": {by: _best(ps, by) for by in ("tokens_per_s", "mean_tokens_per_pass",
                                                           "predicted_speedup_flat64")} if ps else None
           for name, ps in groups.items()}
    token_wise = {}
    for p in groups["token_wise"]:  # the 'default' acceptor's, else the first token-wise one's, at each k
        if p["k"] not in token_wise or p.get("acceptor") == "default":
            token_wise[p["k"]] = p
    out["block_gain"] = {p["k"]: _ratio(p.get("mean_tokens_per_pass"), token_wise[p["k"]].get("mean_tokens_per_pass"))
                         for p in groups["block"] if p["k"] in token_wise}
    out["paired_block_gain"] = pool_paired([p for p in paths if p.get("paired_block_gain")])
    best_chain = _best(chains, "mean_tokens_per_pass")
    best_tree = _best(groups["tree"], "mean_tokens_per_pass")
    out["tree_vs_best_chain"] = _ratio(best_tree and best_tree["mean_tokens_per_pass"],
                                       best_chain and best_chain["mean_tokens_per_pass"])
    same = {}
    for p in groups["tree"]:
        # a tree path's k is its depth + 1 (a dynamic tree's depth is k - 1): the chain of the same depth
        chain = _best([c for c in chains if c["k"] == p["k"]], "mean_tokens_per_pass")
        p["tree_vs_same_depth_chain"] = _ratio(p.get("mean_tokens_per_pass"), chain and chain["mean_tokens_per_pass"])
        same[p.get("label") or str(p.get("tree"))] = p["tree_vs_same_depth_chain"]
    out["tree_vs_same_depth_chain"] = same
    return out


def summarize(paths: list[dict], acceptor: str | None = None) -> dict:
    """Best and median fixed k (token-wise chains under ``acceptor``, the one k=auto runs under;
    None: the paths that name none), k=auto against both (by tokens_per_s), the speedups of the best
    fixed k and of k=auto (call after :func:`add_speedups`), and the verification comparison."""
    auto = _find(paths, "verispec", "speculative", "auto")
    acceptor = acceptor if acceptor is not None else (auto or {}).get("acceptor")
    fixed = [p for p in paths if p["mode"] == "speculative" and p["k"] != "auto" and not _is_tree(p)
             and p.get("acceptor") == acceptor]
    out = {"best_fixed_k": None, "best_fixed_tokens_per_s": None, "median_fixed_tokens_per_s": None,
           "auto_tokens_per_s": auto["tokens_per_s"] if auto else None, "auto_k_counts": auto["k_counts"] if auto else None,
           "auto_over_best": None, "auto_within_3pct_of_best": None, "auto_beats_median": None}
    if fixed:
        best = max(fixed, key=lambda p: p["tokens_per_s"])
        out.update(best_fixed_k=best["k"], best_fixed_tokens_per_s=best["tokens_per_s"],
                   median_fixed_tokens_per_s=statistics.median(p["tokens_per_s"] for p in fixed))
    for name, p in (("best_fixed", best if fixed else None), ("auto", auto)):  # the headline speedups
        for key in ("speedup_vs_target_only", "e2e_speedup_vs_target_only", "e2e_speedup_vs_hf_assisted"):
            out[f"{name}_{key}"] = p.get(key) if p else None
    if fixed and auto:
        out["auto_over_best"] = auto["tokens_per_s"] / out["best_fixed_tokens_per_s"]
        out["auto_within_3pct_of_best"] = out["auto_over_best"] >= 0.97
        out["auto_beats_median"] = auto["tokens_per_s"] > out["median_fixed_tokens_per_s"]
        out.update(_priced_verdict(fixed, auto))
        out.update(_bootstrap(fixed, auto, best))
        if len(auto.get("tokens_per_s_per_repeat", [])) > 1:
            out.update(_per_repeat(fixed, auto))
    out["verification"] = compare_verification(paths)
    return out


# ---- table ----------------------------------------------------------------------------------------


def _label(p) -> str:
    if p["engine"] == "transformers":
        return f"HF {p['mode']}"
    if p["mode"] == "target-only":
        return "target-only"
    return p.get("label") or f"k={p['k']}"


def _fmt(v, f="{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def _diverged(p) -> str:
    d = p.get("greedy_divergence") or p.get("greedy_divergence_from_verispec_target_only") or p.get("coupled_divergence")
    return f"{d['diverged_prompts']}/{d['prompts']}" if d else ""


def _print_verification(console, run) -> None:
    """Best token-wise chain, block chain and tree of a cell, the block gain and the trees' gain, and
    the paths the generator refused."""
    v = run["summary"].get("verification") or {}
    where = f"{run['prompt_set']} T={run['temperature']:g}"
    parts = []
    for name, label in (("best_token_wise", "token-wise chain"), ("best_block", "block chain"), ("best_tree", "tree")):
        b = v.get(name)
        if b and b["tokens_per_s"]:
            parts.append(f"best {label} by tok/s {b['tokens_per_s']['label']} ({b['tokens_per_s']['tokens_per_s']:.2f}), "
                         f"by tok/pass {b['mean_tokens_per_pass']['label']} "
                         f"({b['mean_tokens_per_pass']['mean_tokens_per_pass']:.2f})")
    if (v.get("best_block") or v.get("best_tree")) and parts:
        console.print(f"{where}: " + "; ".join(parts))
        if v.get("block_gain"):
            console.print(f"    block gain (tok/pass over token-wise): "
                          + ", ".join(f"k={k} {_fmt(g, '{:.3f}')}" for k, g in v["block_gain"].items()))
        if v.get("tree_vs_best_chain") is not None:
            console.print(f"    best tree tok/pass over best chain's: {v['tree_vs_best_chain']:.3f}; over the chain of "
                          "the same depth: " + ", ".join(f"{t} {_fmt(g, '{:.3f}')}"
                                                         for t, g in v["tree_vs_same_depth_chain"].items()))
    paired = v.get("paired_block_gain")
    if paired:  # every chain pass at T > 0, block chains in the run or not
        console.print(f"{where}: paired block gain (same drafts, expected tok/pass block/token-wise): " + ", ".join(
            f"g={g} {x['block_tokens_per_pass']:.3f}/{x['token_wise_tokens_per_pass']:.3f} = {x['gain']:.4f}"
            for g, x in paired.items() if g != "all") + f"; all {paired['all']['gain']:.4f} "
            f"over {paired['all']['row_passes']} row-passes")
    if run.get("skipped"):
        console.print(f"{where}: skipped, refused by the generator (reasons in the JSON): "
                      + ", ".join(x["label"] for x in run["skipped"]))


def print_report(data: dict, written) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide enough that no column is cut, notes on one line each
        console = Console(width=max(console.width, 160), soft_wrap=True)
    table = Table(title=f"{data['draft']} -> {data['target']}, {data['amp']}, {data['device']}, "
                        f"acceptor {data.get('acceptor', 'default')}, "
                        f"{data['max_new_tokens']} new tokens, batch 1")
    for col in ("set", "T", "path", "accept", "tok/pass", "nodes/pass", "tok/s", "priced tok/s", "e2e tok/s", "x target",
                "predicted", "flat64", "x HF assisted", "diverged"):
        table.add_column(col, justify="right", no_wrap=True)
    for run in data["runs"]:
        for i, p in enumerate(run["paths"]):
            table.add_row(run["prompt_set"] if i == 0 else "", _fmt(run["temperature"], "{:g}") if i == 0 else "",
                          _label(p), _fmt(p.get("acceptance_rate"), "{:.3f}"), _fmt(p.get("mean_tokens_per_pass")),
                          _fmt(p.get("nodes_per_pass"), "{:.1f}"),
                          _fmt(p["tokens_per_s"]), _fmt(p.get("priced_tokens_per_s")), _fmt(p["e2e_tokens_per_s"]),
                          _fmt(p.get("speedup_vs_target_only")), _fmt(p.get("predicted_speedup")),
                          _fmt(p.get("predicted_speedup_flat64")),
                          _fmt(p.get("e2e_speedup_vs_hf_assisted")), _diverged(p), end_section=i == len(run["paths"]) - 1)
    console.print(table)
    console.print("tok/s: decode only (after prefill; timing in the JSON's method.order); e2e tok/s: wall time with prefill, every engine; "
                  "priced tok/s: the same passes at the cell's pooled pass costs; "
                  "x target: tok/s over verispec target-only; predicted: Leviathan's formula with the path's acceptance and "
                  "costs (in target-only decode steps); flat64: the path's tokens per pass on a flat verify curve "
                  "(one decode step up to 64 tokens) with its measured draft cost per level; x HF assisted: e2e tok/s over transformers assisted; "
                  "diverged: greedy prompts whose tokens differ from verispec target-only"
                  + ("; sampled, coupled acceptor: prompts whose tokens differ from target-only's coupled sample"
                     if data.get("acceptor") == "coupled" else ""))
    for run in data["runs"]:
        s = run["summary"]
        if s["auto_tokens_per_s"] is not None and s["best_fixed_k"] is not None:
            console.print(
                f"{run['prompt_set']} T={run['temperature']:g}: k=auto {s['auto_tokens_per_s']:.2f} tok/s = "
                f"{s['auto_over_best']:.3f} x best fixed k={s['best_fixed_k']} ({s['best_fixed_tokens_per_s']:.2f}); "
                f"median fixed {s['median_fixed_tokens_per_s']:.2f}; within 3% of best: "
                f"{'yes' if s['auto_within_3pct_of_best'] else 'NO'}, beats median: "
                f"{'yes' if s['auto_beats_median'] else 'NO'}; k used {s['auto_k_counts']}"
                + (f"; per repeat: {', '.join(f'{x:.3f}' for x in s['auto_over_best_per_repeat'])} x that repeat's best"
                   if "auto_over_best_per_repeat" in s else ""))
            if "auto_over_best_k_ci90" in s:
                lo, hi = s["auto_over_best_k_ci90"]
                console.print(f"    over the cell's prompts (paired bootstrap): k=auto / k={s['best_fixed_k']} in "
                              f"[{lo:.3f}, {hi:.3f}] (90%); within 3% of a resample's best fixed k in "
                              f"{s['auto_within_3pct_share']:.0%} of resamples")
            if "priced_auto_over_best" in s:
                console.print(
                    f"    priced at the cell's pooled pass costs: k=auto {s['priced_auto_over_best']:.3f} x best fixed "
                    f"k={s['priced_best_fixed_k']}; within 3%: {'yes' if s['priced_auto_within_3pct'] else 'NO'}, "
                    f"beats median: {'yes' if s['priced_auto_beats_median'] else 'NO'}")
    for run in data["runs"]:
        s = run["summary"]
        for name, label in (("best_fixed", f"best fixed k={s['best_fixed_k']}"), ("auto", "k=auto")):
            if s[f"{name}_speedup_vs_target_only"] is not None:
                console.print(
                    f"{run['prompt_set']} T={run['temperature']:g}: {label}: {s[f'{name}_speedup_vs_target_only']:.2f} x "
                    f"verispec target-only (decode), {_fmt(s[f'{name}_e2e_speedup_vs_hf_assisted'])} x transformers "
                    f"assisted (end to end)")
    for run in data["runs"]:
        _print_verification(console, run)
    if data["hf"].get("note") and data["hf"]["note"] != "--no-hf":
        console.print(f"transformers: {data['hf']['note']}")
    bw = data["memory_bandwidth"]
    console.print(f"measured read bandwidth {bw['read_GBps']:.1f} GB/s; target weights {data['target_weight_bytes'] / 1e9:.3f} GB")
    for run in data["runs"]:
        base = _find(run["paths"], "verispec", "target-only")
        if base and base.get("achieved_GBps") is not None:
            console.print(f"{run['prompt_set']} T={run['temperature']:g}: target-only reads its weights at "
                          f"{base['achieved_GBps']:.2f} GB/s, {_fmt(base['fraction_of_read_bandwidth'], '{:.0%}')} "
                          f"of the measured read bandwidth")
    console.print("wrote " + ", ".join(str(w) for w in written))
