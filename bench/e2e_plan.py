"""The options of ``verispec bench e2e`` and the paths they plan: fixed k under each chain acceptor,
k="auto", token trees under each tree acceptor and children mode, tree="auto"; each path's
generator and policy; the checks of the options together, and the cache length the paths need."""

from __future__ import annotations

import math

from .common import is_model_draft, parse_floats, parse_prompt_sets


def _ks(text: str) -> list[int]:
    ks = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            k = int(x)
        except ValueError:
            raise ValueError(f"--ks takes comma-separated integers, got {text!r}") from None
        if k < 2:
            raise ValueError(f"k={k} out of range: k >= 2 (k = 1 is target-only decoding, which is always measured)")
        if k in ks:
            raise ValueError(f"k={k} given twice in --ks {text!r}")
        ks.append(k)
    return ks


def _temperatures(text: str) -> list[float]:
    temps = parse_floats(text, "temperatures")
    if not temps:
        raise ValueError("--temperatures is empty")
    for t in temps:
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature {t} out of range: a finite number >= 0 (0 = greedy)")
    if len(set(temps)) < len(temps):
        raise ValueError(f"--temperatures {text!r} repeats a value")
    return temps


CHAIN_ACCEPTORS = ("default", "block", "coupled", "sample-match")  # the exact chain acceptors (any temperature)
CHILDREN = ("sample", "distinct", "top")


def _names(text: str, option: str, allowed) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for x in names:
        if x not in allowed:
            raise ValueError(f"{option}: unknown {x!r}; use comma-separated names from {', '.join(allowed)}")
    if len(set(names)) < len(names):
        raise ValueError(f"{option} {text!r} repeats a name")
    return names


def _trees(text: str, depth_k: int) -> list[str]:
    """--trees -> canonical tree names ('2,2,1,1', 'dynamic:8'), validated."""
    from verispec.spec.tree import DynamicTree, parse_tree

    out = []
    for x in (x.strip() for x in text.split(";")):
        if not x:
            continue
        try:
            shape = parse_tree(x, max(1, depth_k - 1))
        except (ValueError, TypeError) as e:
            raise ValueError(f"--trees: bad tree {x!r}: {e}") from None
        name = str(shape) if isinstance(shape, DynamicTree) else ",".join(map(str, shape.branching or []))
        if not name:
            raise ValueError(f"--trees: bad tree {x!r}: give a branching such as 2,2,1,1 or dynamic:N")
        if name in out:
            raise ValueError(f"--trees: tree {name!r} given twice")
        out.append(name)
    return out


def _tree_acceptor_names() -> tuple[str, ...]:
    import verispec.spec.tree_acceptors  # noqa: F401  (registers recursive and traversal)
    from verispec.spec.tree import TREE_ACCEPTORS

    return tuple(TREE_ACCEPTORS)


def _plan(args) -> dict:
    """The speculative paths asked for (before the generator's refusals): chains per k and chain
    acceptor, k=auto, trees, the auto tree."""
    ks = _ks(args.ks)
    chain_acceptors = _names(args.chain_acceptors, "--chain-acceptors", CHAIN_ACCEPTORS) \
        if args.chain_acceptors is not None else [args.acceptor]
    if ks and not chain_acceptors:
        raise ValueError("--chain-acceptors is empty")
    if args.tree_depth_k < 2:
        raise ValueError(f"--tree-depth-k must be >= 2 (a dynamic tree of depth k - 1 >= 1), got {args.tree_depth_k}")
    trees = _trees(args.trees, args.tree_depth_k)
    tree_acceptors = _names(args.tree_acceptors, "--tree-acceptors", _tree_acceptor_names())
    tree_children = _names(args.tree_children, "--tree-children", CHILDREN)
    if trees and not (tree_acceptors and tree_children):
        raise ValueError("--trees needs at least one of --tree-acceptors and of --tree-children")
    return {"ks": ks, "chain_acceptors": chain_acceptors, "auto": args.auto, "acceptor": args.acceptor,
            "trees": trees, "tree_acceptors": tree_acceptors, "tree_children": tree_children,
            "tree_depth_k": args.tree_depth_k, "auto_tree": args.auto_tree}


def path_specs(plan: dict, temperature: float) -> list[dict]:
    """One cell's speculative paths, in run order: each fixed k under each chain acceptor, k=auto,
    each tree under each (acceptor, children) (at T=0 once: multistep, top), the auto tree."""
    specs = [{"k": k, "acceptor": a, "tree": None, "children": None}
             for k in plan["ks"] for a in plan["chain_acceptors"]]
    if plan["auto"]:
        specs.append({"k": "auto", "acceptor": plan["acceptor"], "tree": None, "children": None})
    combos = [("multistep", "top")] if temperature == 0 else \
        [(a, c) for a in plan["tree_acceptors"] for c in plan["tree_children"]]
    for tree in plan["trees"]:
        k = plan["tree_depth_k"] if tree.startswith("dynamic:") else len(tree.split(",")) + 1
        specs += [{"k": k, "acceptor": a, "tree": tree, "children": c} for a, c in combos]
    if plan["auto_tree"]:
        specs.append({"k": "auto", "acceptor": None, "tree": "auto", "children": None})
    return specs


def spec_label(spec: dict) -> str:
    if spec["tree"] is None:
        return f"k={spec['k']}" + ("" if spec["acceptor"] in (None, "default") else f" {spec['acceptor']}")
    if spec["tree"] == "auto":
        return "k=auto tree=auto"
    return f"tree {spec['tree']} {spec['acceptor']}/{spec['children']}"


def make_generator(draft, target, spec: dict, temperature: float, policy=None, probe: bool = False):
    """The SpeculativeGenerator of a path spec (ValueError/TypeError: the generator refuses it,
    at construction or, for an acceptor exact at T=0 only, at sampling time). ``probe``: a chain's
    acceptor is wrapped in PairedBlockGain (both rules' expected drafts kept from its drafts)."""
    from verispec.spec import PairedBlockGain, SpeculativeGenerator
    from verispec.spec.resolve import make_acceptor

    k = spec["k"] if policy is None else policy
    if spec["tree"] is None:
        acceptor = PairedBlockGain(make_acceptor(spec["acceptor"], target)) if probe else spec["acceptor"]
        return SpeculativeGenerator(draft, target, k, acceptor=acceptor, measure_decode_step=False)
    kw = {} if spec["children"] is None else {"children": spec["children"]}
    if spec["tree"] != "auto" and not spec["tree"].startswith("dynamic:"):
        k = None  # a static tree sets k = depth + 1
    gen = SpeculativeGenerator(draft, target, k, acceptor=spec["acceptor"], measure_decode_step=False,
                               tree=spec["tree"], **kw)
    check = getattr(gen, "_check_tree_acceptor", None)
    if check is not None and getattr(gen, "_tree_acceptor", None) is not None:
        from verispec.model.sampling import SamplingParams

        check(SamplingParams(temperature))  # e.g. the greedy tree acceptor at T > 0
    return gen


def path_policy(spec: dict, policies: dict):
    """The run's one policy object of a path (k=auto's AdaptiveK, the auto tree's AdaptiveTree), or None."""
    if spec["tree"] is None:
        return policies.get(spec["k"])
    return policies.get("auto-tree") if spec["tree"] == "auto" else None


def shared_policies(plan: dict) -> dict:
    """One k-policy per adaptive path for the whole run, as a long-lived engine keeps it (its
    one-off calibration runs in the untimed warm-up)."""
    from verispec.spec.policy import as_policy

    policies = {"auto": as_policy("auto")} if plan["auto"] else {}
    if plan["auto_tree"]:
        try:
            from verispec.spec.tree_policy import auto_tree_policy
        except ImportError:  # no tree policy in this generator: the path is refused and listed
            pass
        else:
            policies["auto-tree"] = auto_tree_policy("auto")
    return policies


def accepted_paths(draft, target, specs: list[dict], temperature: float) -> tuple[list[dict], list[dict]]:
    """(specs the generator accepts, [{spec, label, reason}] of those it refuses)."""
    ok, skipped = [], []
    for spec in specs:
        try:
            make_generator(draft, target, spec, temperature)
        except (ValueError, TypeError) as e:
            skipped.append({**spec, "label": spec_label(spec), "reason": str(e)})
        else:
            ok.append(spec)
    return ok, skipped


def check_args(args) -> tuple[dict, list[float], list[str]]:
    plan = _plan(args)
    specs = plan["ks"] + (["auto"] if plan["auto"] else [])
    if not specs and not plan["trees"] and not plan["auto_tree"]:
        raise ValueError("nothing speculative to run: --ks is empty and --no-auto")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.draft_amx and not is_model_draft(args.draft):
        raise ValueError(f"--draft-amx needs a draft model; the draft is {args.draft!r}")
    if args.draft_quant and not is_model_draft(args.draft):
        raise ValueError(f"--draft-quant {args.draft_quant} needs a draft model; the draft is {args.draft!r}")
    if plan["trees"] and not is_model_draft(args.draft) and not str(args.draft).startswith("self:"):
        raise ValueError(f"--trees needs a draft that drafts token trees (a model or 'self:N'); the draft is {args.draft!r}")
    return plan, _temperatures(args.temperatures), parse_prompt_sets(args.prompt_sets, args.prompts, args.random_prompts)


def _max_block(plan: dict) -> int:
    """The most tokens one verify pass of the plan may score (its cache margin)."""
    from verispec.spec.policy import as_policy
    from verispec.spec.tree import parse_tree

    blocks = [as_policy(k).max_k for k in plan["ks"] + (["auto"] if plan["auto"] else [])]
    for tree in plan["trees"]:
        shape = parse_tree(tree, plan["tree_depth_k"] - 1)
        # a dynamic tree feeds its expanded levels (width x (depth - 1) nodes) past the prefix while it grows
        blocks += [max(shape.n_nodes, getattr(shape, "width", 0) * (shape.max_depth - 1)) + 1]
    if plan["auto_tree"]:  # its trees are the policy's: room for a pass of AUTO_TREE_BLOCK tokens
        blocks.append(AUTO_TREE_BLOCK)
    return max(blocks)


AUTO_TREE_BLOCK = 32


def positions_needed(prompts: dict, plan: dict, new_tokens: int, max_positions: int) -> int:
    """Cache length: the longest prompt, the new tokens and one verify block of the largest k or tree."""
    longest = max(len(p) for ps in prompts.values() for p in ps)
    if longest + new_tokens > max_positions:
        raise ValueError(f"longest prompt ({longest} tokens) + --max-new-tokens {new_tokens} exceeds the target's "
                         f"max_position_embeddings={max_positions}")
    max_k = _max_block(plan)
    n_positions = min(longest + new_tokens + max_k, max_positions)
    if max_k >= n_positions:
        raise ValueError(f"k={max_k} out of range: a verify pass of k tokens needs k < n_positions={n_positions}")
    return n_positions
