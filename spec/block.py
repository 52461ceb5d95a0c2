"""Block verification (Sun, Mendlovic, Leviathan, Aharoni, Beirami, Ro, Suresh, "Block Verification
Accelerates Speculative Decoding", ICLR 2025, arXiv 2403.10444, Algorithm 2): the same chain of
drafts and the same verify pass as rejection sampling, but how much of the chain to keep is decided
from the joint (block) probabilities of the drafted prefixes instead of token by token.

Names follow the papers: ``target_probs`` = p, ``draft_probs`` = q. For one row with drafts
x_1..x_g (x_i sampled from q_i = q(. | x_<i)), and p_i = p(. | x_<i):

  weights   w_0 = 1,  w_i = min(1, w_{i-1} p_i(x_i) / q_i(x_i))              (i = 1..g)
  residual  r_i(x) = max(0, w_i p_{i+1}(x) - q_{i+1}(x)),  R_i = sum_x r_i(x)  (i = 0..g-1)
  stop      h_i = R_i / (R_i + 1 - w_i)  (i < g),   h_g = w_g
  keep      tau = the largest i in 1..g with u_i < h_i (u_i uniform), else 0
  emit      one token from normalize(r_tau) if tau < g, from p_{g+1} if tau = g.

Why it is exact (docs/exactness.md, "Block verification"): by induction from i = g down,
P(drafts start x_1..x_i and tau >= i) = q(x_1..x_i) w_i, and P(drafts start x_1..x_i, tau = i,
emit y) = q(x_1..x_i) r_i(y); the two add up to q(x_1..x_i) w_i p_{i+1}(y), which makes the emitted
block, continued by target sampling, distributed as target-only sampling. Token-wise rejection
sampling keeps x_1..x_i with prob. prod_j min(1, p_j/q_j) <= w_i, so block verification never
keeps fewer drafts in expectation; with one draft the two rules coincide.

Defined corners, never NaN: a draft with q_i(x_i) = 0 continues the weight iff p_i(x_i) > 0 (as
``rejection_sample`` accepts it); h_i = 0 where R_i = 0 (a residual without mass is never chosen;
when also w_i = 1 the stop is unreachable in exact arithmetic); if rounding still lands on an empty
residual, the token is drawn from p_{tau+1}. With one-hot p and q (temperature 0) the weights are 1
along the prefix that matches the argmax and 0 after it, so the rule keeps exactly that prefix and
emits the argmax: greedy decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .protocols import AcceptorBase, read_through
from .rejection import check_shapes


class BlockTerms(NamedTuple):
    """The decision terms of one verify pass; every later random choice is a function of these."""

    weights: torch.Tensor  # [B, g + 1] w_0..w_g (w_0 = 1)
    residual_mass: torch.Tensor  # [B, g] R_0..R_{g-1}
    stop: torch.Tensor  # [B, g] h_1..h_g: P(keep exactly i drafts | the longer prefixes were not kept)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (the exact-enumeration tests run in fp64)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _drafted(draft_ids: torch.Tensor, q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_i(x_i), q_i(x_i)) of every row and draft, [B, g] each."""
    g = draft_ids.shape[1]
    idx = draft_ids.long()[..., None]  # [B, g, 1]
    return torch.gather(p[:, :g], 2, idx)[..., 0], torch.gather(q, 2, idx)[..., 0]


def _capped_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """min(1, num / den) without 0/0: num >= den gives 1 unless num = 0 (then den = 0 too: 0)."""
    ratio = num / torch.where(den > 0, den, torch.ones_like(num))
    return torch.where(num >= den, (num > 0).to(num.dtype), ratio)


def block_weights(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:  # [B, g] each -> [B, g + 1]
    """w_0 = 1, w_i = min(1, w_{i-1} p_i(x_i) / q_i(x_i)) from the drafted tokens' probabilities."""
    B, g = p_x.shape
    weights = torch.ones(B, g + 1, dtype=p_x.dtype, device=p_x.device)
    for i in range(g):  # w_{i-1} p_i(x_i) (1-based i in the module docstring) against q_i(x_i)
        weights[:, i + 1] = _capped_ratio(weights[:, i] * p_x[:, i], q_x[:, i])
    return weights


def token_wise_weights(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:  # [B, g] each -> [B, g + 1]
    """t_0 = 1, t_i = prod_{j <= i} min(1, p_j(x_j) / q_j(x_j)): the chance that token-wise rejection
    sampling keeps x_1..x_i (the same corners as ``rejection_sample``)."""
    B = p_x.shape[0]
    one = torch.ones(B, 1, dtype=p_x.dtype, device=p_x.device)
    return torch.cat([one, torch.cumprod(_capped_ratio(p_x, q_x), dim=1)], dim=1)


def block_terms(
    draft_ids: torch.Tensor,  # [B, g] int64
    draft_probs: torch.Tensor,  # [B, g, V]: q, what each draft was sampled from
    target_probs: torch.Tensor,  # [B, g + 1, V]: p at the k verify positions
) -> BlockTerms:
    """Weights w_i, residual masses R_i and stop probabilities h_i of every row (module docstring)."""
    dtype = _compute_dtype(draft_probs, target_probs)
    p = target_probs.to(dtype)
    q = draft_probs.to(dtype)
    g = draft_ids.shape[1]
    p_x, q_x = _drafted(draft_ids, q, p)
    weights = block_weights(p_x, q_x)  # [B, g + 1]
    # R_i for i = 0..g-1: mass of max(0, w_i p_{i+1} - q_{i+1}) (p_{i+1}, q_{i+1} sit at index i)
    residual_mass = (weights[:, :g, None] * p[:, :g] - q).clamp(min=0).sum(-1)  # [B, g]
    denom = residual_mass + (1 - weights[:, :g])  # [B, g] = E_{x ~ q_{i+1}}[1 - w_{i+1}(x)]
    h = torch.where(residual_mass > 0, residual_mass / torch.where(denom > 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(denom))  # [B, g]: h_0..h_{g-1}; only h_1.. are used
    stop = torch.cat([h[:, 1:], weights[:, g:]], dim=1) if g else h  # [B, g]: h_1..h_{g-1}, h_g = w_g
    return BlockTerms(weights, residual_mass, stop.clamp(0, 1))


def block_residual(
    draft_probs: torch.Tensor,  # [B, g, V]
    target_probs: torch.Tensor,  # [B, g + 1, V]
    weights: torch.Tensor,  # [B, g + 1] from block_terms
    kept: torch.Tensor,  # [B] int64 tau in 0..g
) -> torch.Tensor:  # [B, V] unnormalised law of the emitted token
    """max(0, w_tau p_{tau+1} - q_{tau+1}) for tau < g (p_{tau+1} where that has no mass), p_{g+1} for tau = g."""
    dtype = weights.dtype
    B, g = draft_probs.shape[0], draft_probs.shape[1]
    rows = torch.arange(B, device=target_probs.device)
    p_t = target_probs[rows, kept].to(dtype)  # [B, V]
    if not g:
        return p_t
    q_t = draft_probs[rows, kept.clamp(max=g - 1)].to(dtype)  # [B, V]
    w_t = weights[rows, kept][:, None]  # [B, 1]
    r = (w_t * p_t - q_t).clamp(min=0)
    use_p = (kept == g) | (r.sum(-1) <= 0)  # bonus, or an empty residual (rounding only)
    return torch.where(use_p[:, None], p_t, r)


def block_verify(
    draft_ids: torch.Tensor,  # [B, g] int64, g = k - 1 >= 0
    draft_probs: torch.Tensor,  # [B, g, V] fp32: q
    target_probs: torch.Tensor,  # [B, g + 1, V] fp32: p
    uniforms: torch.Tensor,  # [B, g] in [0, 1): u_1..u_g, the stop tests
    exponentials: torch.Tensor,  # [B, V] > 0: Exp(1) race for the emitted token
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted [B] int64 in 0..g, tokens [B, g + 1] int64
    """Block verification with explicit random numbers: the twin of ``rejection_sample``."""
    B, g, V = check_shapes(draft_ids, draft_probs, target_probs, uniforms, exponentials)
    terms = block_terms(draft_ids, draft_probs, target_probs)
    device = target_probs.device
    ok = uniforms.to(terms.stop.dtype) < terms.stop  # [B, g]: u_i < h_i
    positions = torch.arange(1, g + 1, device=device)  # [g]
    kept = (ok.long() * positions).amax(dim=1) if g else torch.zeros(B, dtype=torch.long, device=device)  # [B] tau
    r = block_residual(draft_probs, target_probs, terms.weights, kept)  # [B, V]
    emitted = torch.argmax(r / exponentials.to(r.dtype), dim=-1)  # [B]; lowest id on ties
    tokens = torch.full((B, g + 1), -1, dtype=torch.long, device=device)
    if g:
        keep = torch.arange(g, device=device)[None] < kept[:, None]  # [B, g]
        tokens[:, :g] = torch.where(keep, draft_ids.long(), tokens[:, :g])
    tokens[torch.arange(B, device=device), kept] = emitted
    return kept, tokens


class BlockAcceptor(AcceptorBase):
    """Exact block verification (Sun et al., ICLR 2025): never fewer drafts kept in expectation
    than token-wise rejection sampling from the same drafts. See :func:`block_verify`.

    Random numbers: ``g`` uniforms per row from ``rng.uniforms`` (the stop tests) and ``V``
    exponentials per row from ``rng.exponentials`` (the emitted token), as the default acceptor.
    At temperature 0 (one-hot p and q) its decisions are those of ``accept_greedy``.
    """

    lossless = True
    name = "block"

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is BlockAcceptor  # a subclass may change the rule; it opts in itself

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        uniforms = rng.uniforms(B, g)  # [B, g] accept stream
        exponentials = rng.exponentials(B, target_probs.shape[-1])  # [B, V] race stream
        return block_verify(draft_ids, draft_probs, target_probs, uniforms, exponentials)


class PairedBlockGain(AcceptorBase):
    """Wraps any chain acceptor (it decides nothing itself) and measures, from the very drafts of
    each verify pass, how many drafts block verification and token-wise rejection sampling keep in
    expectation: per row, sum_i w_i and sum_i t_i (:func:`block_weights`, :func:`token_wise_weights`).

    Why these are the right numbers: the drafts are sampled from q whatever the rule, and for both
    rules P(keep >= i | the pass's context) = E_{x ~ q}[w_i] resp. E_{x ~ q}[t_i] (the induction in the
    module docstring; for token-wise the product of the acceptance chances). So each sum is an
    unbiased estimate of the rule's expected drafts kept at that pass, both from the same drafts, and
    since w_i >= t_i for every draft (induction on i), the paired difference is never negative. It
    carries no noise from the accept/reject uniforms, so a few hundred passes resolve a gain that the
    realised tokens per pass of two separate runs (different texts at T > 0) cannot.

    Costs two gathers of [B, g] per pass. At temperature 0 with a greedy-id acceptor the generator
    calls ``accept_greedy`` (no probabilities): nothing is recorded there (both rules keep the
    argmax-matching prefix). ``summary()`` gives the totals; ``reset()`` clears them.
    """

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.by_drafts: dict[int, list] = {}  # g -> [row-passes, block expected kept, token-wise expected kept]

    name = read_through("name", "acceptor")  # the wrapped acceptor's members
    lossless = read_through("lossless", None)
    exact_when_greedy = read_through("exact_when_greedy", False)
    coupled = read_through("coupled", False)
    accepts_greedy_ids = read_through("accepts_greedy_ids", False)

    def accept_greedy(self, draft_ids, choice):
        return self.inner.accept_greedy(draft_ids, choice)

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        if g:
            dtype = _compute_dtype(draft_probs, target_probs)
            p_x, q_x = _drafted(draft_ids, draft_probs, target_probs)
            p_x, q_x = p_x.to(dtype), q_x.to(dtype)
            entry = self.by_drafts.setdefault(g, [0, 0.0, 0.0])
            entry[0] += B
            entry[1] += float(block_weights(p_x, q_x)[:, 1:].sum())
            entry[2] += float(token_wise_weights(p_x, q_x)[:, 1:].sum())
        return self.inner(draft_ids, draft_probs, target_probs, rng)

    def summary(self) -> dict:
        """Per number of drafts g (as a string key): row-passes and the expected tokens per pass
        (drafts kept + the emitted one) of each rule, and their ratio (block over token-wise)."""
        out = {}
        for g, (n, block, token) in sorted(self.by_drafts.items()):
            out[str(g)] = {"row_passes": n, "block_tokens_per_pass": 1 + block / n,
                           "token_wise_tokens_per_pass": 1 + token / n,
                           "gain": (1 + block / n) / (1 + token / n)}
        return out
