"""The exactness checker (docs/exactness.md tiers 3 and 4), as a library function.

It enumerates the exact target-only distribution of a length-L continuation (all V^L
outcomes, through the target's own ``forward`` and the same ``logits_to_probs`` the sampler
uses), runs the real :class:`SpeculativeGenerator` on many identical prompts in ONE batch, and
compares the empirical joint histogram with the exact one (chi-square or G test, small cells
pooled). Verdict: FAIL when the p-value is below ``threshold`` (1e-6) for any prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ..model.sampling import SamplingParams, logits_to_probs
from ..testing import BIASED_ACCEPTORS, ArgmaxSoftQDraft, MarkovChainLM
from .generator import SpeculativeGenerator
from .goodness_of_fit import goodness_of_fit
from .resolve import make_acceptor, make_policy

STATISTICS = ("chi2", "g")


@torch.inference_mode()
def exact_continuation_probs(model, prompt, length: int, params: SamplingParams, eos_token_id=None) -> torch.Tensor:
    """[V^length] float64: P(continuation) under target-only sampling, outcome index
    sum_t x_t * V^(length-1-t). After an EOS every later token is that EOS (as the samplers fill)."""
    V = model.vocab_size
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())),
                       dtype=torch.long)
    joint = torch.ones(1, dtype=torch.float64)  # [V^t] over prefixes of length t
    prefixes = torch.zeros(1, 0, dtype=torch.long)  # [V^t, t]
    for t in range(length):
        N = prefixes.shape[0]
        seqs = torch.cat([prompt.expand(N, -1), prefixes], 1)  # [N, P + t]
        probs = torch.empty(N, V, dtype=torch.float64)
        for s in range(0, N, model.batch_size):
            chunk = seqs[s : s + model.batch_size]
            last = torch.full((len(chunk), 1), chunk.shape[1] - 1)
            logits = model.forward(chunk, torch.zeros(len(chunk), dtype=torch.long), logits_at=last)[:, 0]
            probs[s : s + len(chunk)] = logits_to_probs(logits, params).double()
        probs /= probs.sum(-1, keepdim=True)
        if eos.numel() and t:
            is_eos = torch.isin(prefixes, eos)  # [N, t]
            ended = is_eos.any(1)
            first = prefixes.gather(1, is_eos.long().argmax(1, keepdim=True))[:, 0]  # the ending EOS
            probs[ended] = torch.nn.functional.one_hot(first[ended], V).double()
        joint = (joint[:, None] * probs).reshape(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(N)[:, None]], 1)
    return joint


def outcome_counts(continuations: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """continuations [N, L] -> counts [V^L] (same indexing as exact_continuation_probs)."""
    L = continuations.shape[1]
    weights = vocab_size ** torch.arange(L - 1, -1, -1)  # [L]
    return torch.bincount((continuations.long() * weights).sum(1), minlength=vocab_size**L)


@dataclass
class ExactnessReport:
    verdict: str  # "PASS" or "FAIL"
    statistic: str  # "chi2" or "g"
    value: float
    dof: int
    p_value: float
    tv_distance: float
    threshold: float
    groups: list = field(default_factory=list)  # per prompt: goodness_of_fit() dict + prompt
    config: dict = field(default_factory=dict)
    speculation: dict = field(default_factory=dict)  # acceptance statistics of the run

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def format(self) -> str:
        c = self.config
        if "children_modes" in c:  # check_tree_exactness
            lines = [
                f"tree acceptor {c['acceptor']} (lossless claim: {c['lossless']}, for children {c['children_modes']}), "
                f"tree parents {c['tree']}, children={c['children']}, draft {c['draft']}, temperature={c['temperature']}",
                f"V={c['vocab']}, L={c['length']}, {c['samples']} trees in one batch, seed={c['seed']}",
            ]
        else:
            shape = f"tree={c['tree']}, children={c['children']}" if c.get("tree") else f"k={c['k']}"
            lines = [
                f"acceptor {c['acceptor']} (lossless claim: {c['lossless']}), draft {c['draft']}, {shape}, "
                f"temperature={c['temperature']}, top_k={c['top_k']}, top_p={c['top_p']}",
                f"V={c['vocab']}, L={c['length']}, {c['samples']} samples in one batch, seed={c['seed']}",
            ]
        for grp in self.groups:
            lines.append(
                f"  prompt {grp['prompt']}: chi2={grp['chi2']:.2f} (p={grp['p_chi2']:.3g}), G={grp['g']:.2f} "
                f"(p={grp['p_g']:.3g}), dof={grp['dof']}, TV={grp['tv_distance']:.4f}, "
                f"{grp['cells']} cells in {grp['bins']} bins" + (f", {grp['impossible']} IMPOSSIBLE" if grp["impossible"] else "")
            )
        a = self.speculation.get("acceptance_rate")
        if "mean_path_length" in self.speculation:
            lines.append(f"mean accepted path length {self.speculation['mean_path_length']:.3f} of "
                         f"{len(self.speculation['paths_by_length']) - 1}")
        else:
            lines.append(f"acceptance rate {a:.3f}" if a is not None else "acceptance rate n/a (k=1)")
        lines.append(f"{self.statistic}={self.value:.2f}, dof={self.dof}, p={self.p_value:.3g}, TV={self.tv_distance:.4f} "
                     f"-> {self.verdict} (fail if p < {self.threshold:g})")
        return "\n".join(lines)


def _toy_for(model, rows: int):
    if getattr(model, "batch_size", 0) >= rows:
        return model
    if hasattr(model, "with_batch_size"):
        return model.with_batch_size(rows)
    raise ValueError(f"model batch_size={model.batch_size} is smaller than samples={rows} and it has no with_batch_size()")


def check_exactness(
    acceptor=None,
    draft="model",
    k: int | None = None,
    *,
    tree=None,
    children: str = "sample",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    samples: int = 100_000,
    length: int = 4,
    vocab: int = 6,
    order: int = 1,
    prompts=((0,),),
    seed: int = 0,
    chain_seed: int | None = None,
    eos_token_id=None,
    target=None,
    threshold: float = 1e-6,
    statistic: str = "chi2",
    min_expected: float = 5.0,
) -> ExactnessReport:
    """Run the speculative loop on toy chains and test its output against the exact distribution.

    target: a model with the model interface (default: a random MarkovChainLM over ``vocab``
    tokens from ``chain_seed``); draft: ``"model"`` (a different random chain), a model,
    ``"ngram"``, ``"self:N"``, ``"argmax-softq"`` (deliberately biased), a provider, or
    ``"module:attr"``; acceptor: None/name/callable/``"module:attr"`` (``"shared-uniform"`` is
    deliberately biased). Rows are split evenly over ``prompts``; each prompt is tested.
    k: None = 4 for chains; with ``tree`` (and ``children``) the loop runs token trees
    (``SpeculativeGenerator(tree=...)``) and ``acceptor`` names a tree acceptor.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    prompts = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if not prompts or samples < len(prompts) or samples < 1:
        raise ValueError(f"need at least one prompt and samples >= number of prompts, got {samples} for {len(prompts)}")
    chain_seed = seed if chain_seed is None else chain_seed
    if tree is None:
        k = 4 if k is None else k
        max_k = make_policy(k).max_k
    else:
        from .tree import DynamicTree, parse_tree
        from .tree_policy import auto_tree_policy

        if tree == "auto":
            k = auto_tree_policy(k)
            max_k = k.max_k
        else:
            shape = parse_tree(tree, None if k is None else k - 1)
            max_k = (k or shape.max_depth + 1) if isinstance(shape, DynamicTree) else shape.max_depth + 1
    # the loop runs max_k - 1 tokens past the tested window, so that no pass inside the window is
    # cut short by the sequence's end: every pass there may carry all k - 1 drafts
    run_on = max_k - 1
    n_positions = max(len(p) for p in prompts) + length + run_on + max_k + 1
    if target is None:
        target = MarkovChainLM.random(vocab, chain_seed, order=order, n_positions=n_positions, batch_size=samples)
    target = _toy_for(target, samples)
    V = target.vocab_size
    if V**length > 10_000_000:
        raise ValueError(f"V^L = {V}^{length} outcomes is too many to enumerate; lower length")
    draft_name = draft if isinstance(draft, str) else getattr(draft, "name", type(draft).__name__)
    if isinstance(draft, str) and draft in ("model", "argmax-softq"):
        chain = MarkovChainLM.random(V, chain_seed + 7919, order=getattr(target, "order", 1),
                                     n_positions=target.n_positions, batch_size=samples)
        draft = chain if draft == "model" else ArgmaxSoftQDraft(chain)
    elif hasattr(draft, "forward") and not hasattr(draft, "propose"):
        draft = _toy_for(draft, samples)
    if tree is None:
        acceptor = make_acceptor(acceptor, target, extra=BIASED_ACCEPTORS)
    params = SamplingParams(temperature, top_k, top_p)

    per_group = samples // len(prompts)
    rows = [p for p in prompts for _ in range(per_group)]
    same_length = len({len(p) for p in prompts}) == 1
    input_ids = torch.stack(rows) if same_length else rows
    gen = SpeculativeGenerator(draft, target, k, acceptor=acceptor, measure_decode_step=False,
                               **({} if tree is None else {"tree": tree, "children": children}))
    acceptor = gen.acceptor if tree is None else gen._tree_acceptor
    # rows run on past their first L tokens (shorter prompts further); the first L keep their law
    seq_len = max(len(p) for p in prompts) + length + run_on
    result = gen.generate(input_ids, seq_len, temperature, top_k, top_p, seed=seed, eos_token_id=eos_token_id)

    groups = []
    for i, p in enumerate(prompts):
        cont = result.tokens[i * per_group : (i + 1) * per_group, len(p) : len(p) + length]
        exact = exact_continuation_probs(target, p, length, params, eos_token_id)
        fit = goodness_of_fit(outcome_counts(cont, V), exact, min_expected)
        groups.append({"prompt": p.tolist(), **fit})
    key = "p_chi2" if statistic == "chi2" else "p_g"
    worst = min(groups, key=lambda grp: grp[key])
    config = {
        "acceptor": getattr(acceptor, "name", type(acceptor).__name__), "lossless": getattr(acceptor, "lossless", None),
        "draft": draft_name, "k": k, "tree": None if tree is None else str(gen._tree), "children": children,
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "samples": samples,
        "length": length, "vocab": V, "order": getattr(target, "order", None), "seed": seed, "chain_seed": chain_seed,
        "eos_token_id": eos_token_id,
    }
    return ExactnessReport(
        verdict="FAIL" if worst[key] < threshold else "PASS",
        statistic=statistic,
        value=worst[statistic],
        dof=worst["dof"],
        p_value=worst[key],
        tv_distance=worst["tv_distance"],
        threshold=threshold,
        groups=groups,
        config=config,
        speculation=result.stats.to_dict(),
    )



# ---- token trees: a tree acceptor checked on toy chains, without the generator --------------------------


def sample_tree(tree, P: torch.Tensor, Q: torch.Tensor, rows: int, gen: torch.Generator, children: str = "sample",
                root=0):
    """Draft one token tree per row from the order-1 draft table ``Q`` [V, V] (row = context token)
    and score it with the target table ``P`` [V, V]; ``root``: the last committed token (an int, or
    [rows] int64). Siblings, level by level:

    - "sample": i.i.d. from q = Q[parent's token]; every sibling's node_q is q.
    - "distinct": without replacement (sequential draws from q); sibling j's node_q is the law it was
      drawn from: q with the earlier siblings' tokens removed, renormalised. Needs b <= the number
      of tokens q can draw.
    - "top": the b likeliest tokens under q (ties: lowest id first), deterministic; node_q is
      one-hot at the node's token (its law given the context).

    -> node_ids [rows, N] int64, node_q [rows, N, V] fp32, target_probs [rows, N + 1, V] fp32."""
    from .tree import CHILDREN_MODES
    from .tree_children import draw_children

    if children not in CHILDREN_MODES:
        raise ValueError(f"children must be one of {CHILDREN_MODES}, got {children!r}")
    V = Q.shape[-1]
    N = tree.n_nodes
    root = torch.as_tensor(root, dtype=torch.long).expand(rows)  # [rows]
    ids = torch.zeros(rows, N, dtype=torch.long)
    node_q = torch.zeros(rows, N, V, dtype=torch.float32)
    for u in range(-1, N):
        ch = tree.children(u)
        if not ch:
            continue
        b = len(ch)
        if b > V and children != "sample":
            raise ValueError(f"children={children!r} needs at most V={V} siblings, node {u} has {b}")
        q_rows = Q[root if u < 0 else ids[:, u]]  # [rows, V]
        drawn, laws = draw_children(q_rows, b, children, gen, exhausted="raise")
        for j, c in enumerate(ch):
            ids[:, c] = drawn[:, j]
            node_q[:, c] = laws[:, j].float()
    target_probs = torch.cat([P[root][:, None], P[ids]], 1).float()  # [rows, N + 1, V]
    return ids, node_q, target_probs


def chain_law(P: torch.Tensor, root: int, length: int) -> torch.Tensor:
    """[V^length] float64: P(the next ``length`` tokens) of the order-1 chain ``P`` after ``root``
    (row-major: the first token slowest, as :func:`outcome_counts`)."""
    law = P[root].double()  # [V]
    for _ in range(length - 1):
        law = law.unsqueeze(-1) * P.double()  # [..., prev, 1] * [prev, next]
    return law.reshape(-1)


def _tree_acceptor(acceptor):
    from .resolve import make_tree_acceptor

    if acceptor is None:
        raise ValueError("unknown tree acceptor None: name one")
    return make_tree_acceptor(acceptor)


def check_tree_exactness(
    acceptor,
    tree,
    children: str = "sample",
    *,
    temperature: float = 1.0,
    samples: int = 40_000,
    vocab: int = 4,
    seed: int = 0,
    chain_seed: int | None = None,
    chains=None,
    threshold: float = 1e-6,
    statistic: str = "chi2",
    min_expected: float = 5.0,
) -> ExactnessReport:
    """Check a tree acceptor for exactness on toy order-1 Markov chains, without the generator.

    acceptor: a name in ``TREE_ACCEPTORS``, a callable with the tree acceptor protocol
    (spec/tree.py; a class is instantiated) or ``"module:attr"``; tree: a ``TreeSpec`` or a
    branching list such as [2, 2]; children: "sample", "distinct" or "top" (:func:`sample_tree`).
    The chains: target = ``MarkovChainLM.random(vocab, chain_seed)``, draft = the one at
    ``chain_seed + 7919`` (as :func:`check_exactness`), both at ``temperature``; or ``chains`` =
    (P, Q), [V, V] next-token probability tables used as they are. ``samples`` rows each draft a
    tree after the token 0, run the acceptor once, and continue path + emitted token by target
    sampling to L = max_depth + 1 tokens; the joint histogram of those L tokens is tested against
    the target chain's exact law (FAIL when the p-value is below ``threshold``).
    Random numbers: the trees and the continuation from ``Generator(seed)``, the acceptor's
    ``AcceptorRandomness`` from seeds seed + 7 (accept) and seed + 8 (race)."""
    from .randomness import AcceptorRandomness
    from .tree import TreeSpec

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if not isinstance(tree, TreeSpec):
        tree = TreeSpec.from_branching(tree)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    acceptor = _tree_acceptor(acceptor)
    chain_seed = seed if chain_seed is None else chain_seed
    if chains is None:
        params = SamplingParams(temperature)
        tables = [MarkovChainLM.random(vocab, s).table() for s in (chain_seed, chain_seed + 7919)]
        P, Q = (logits_to_probs(t, params).double() for t in tables)
        P, Q = P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)
    else:
        P, Q = (torch.as_tensor(t, dtype=torch.float64) for t in chains)
    V = P.shape[-1]
    D = tree.max_depth
    L = D + 1
    if V**L > 10_000_000:
        raise ValueError(f"V^L = {V}^{L} outcomes is too many to enumerate; use a shallower tree or a smaller vocab")
    root = 0
    gen = torch.Generator().manual_seed(seed)
    ids, node_q, target_probs = sample_tree(tree, P, Q, samples, gen, children, root)
    rng = AcceptorRandomness(torch.Generator().manual_seed(seed + 7), torch.Generator().manual_seed(seed + 8))
    path, count, emitted = acceptor(tree, ids, node_q, target_probs, rng)
    path, count, emitted = path.long().cpu(), count.long().cpu(), emitted.long().cpu()
    if path.shape != (samples, D) or count.shape != (samples,) or emitted.shape != (samples,):
        raise ValueError(f"the acceptor returned path {tuple(path.shape)}, count {tuple(count.shape)}, emitted "
                         f"{tuple(emitted.shape)}; expected [{samples}, {D}], [{samples}], [{samples}]")
    rows = torch.arange(samples)
    stream = torch.full((samples, L), -1, dtype=torch.long)  # path tokens, the emitted token, then target samples
    stream[:, :D] = torch.where(path >= 0, ids.gather(1, path.clamp(min=0)), -1)
    stream[rows, count] = emitted
    for t in range(1, L):  # target-only sampling after the pass (what the next passes are exact for)
        need = count < t  # [samples]: position t lies after the pass's emitted token
        draw = torch.multinomial(P[stream[:, t - 1].clamp(min=0)], 1, generator=gen)[:, 0]
        stream[:, t] = torch.where(need, draw, stream[:, t])
    fit = goodness_of_fit(outcome_counts(stream, V), chain_law(P, root, L), min_expected)
    key = "p_chi2" if statistic == "chi2" else "p_g"
    config = {
        "acceptor": getattr(acceptor, "name", type(acceptor).__name__), "lossless": getattr(acceptor, "lossless", None),
        "children_modes": list(getattr(acceptor, "children_modes", ())), "tree": list(tree.parents),
        "children": children, "draft": "chain" if chains is None else "given", "k": tree.n_nodes + 1,
        "temperature": temperature, "top_k": None, "top_p": None, "samples": samples, "length": L, "vocab": V,
        "order": 1, "seed": seed, "chain_seed": chain_seed if chains is None else None,
    }
    lengths = torch.bincount(count, minlength=D + 1)
    speculation = {"acceptance_rate": float(count.double().mean()) / D, "mean_path_length": float(count.double().mean()),
                   "paths_by_length": lengths.tolist()}
    return ExactnessReport(
        verdict="FAIL" if fit[key] < threshold else "PASS", statistic=statistic, value=fit[statistic], dof=fit["dof"],
        p_value=fit[key], tv_distance=fit["tv_distance"], threshold=threshold, groups=[{"prompt": [root], **fit}],
        config=config, speculation=speculation)
