"""Sampling parameters and the logits -> probabilities -> token path shared by target-only
sampling and the speculative loop (which must apply the SAME processing to both models).

Order, as in Hugging Face: temperature, then top-k, then top-p. Temperature 0 means greedy:
the distribution is one-hot on the argmax (lowest id on ties), so exact acceptors and the
greedy path agree on what "the target's choice" is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1)):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _nan_error(who: str) -> FloatingPointError:
    return FloatingPointError(f"{who} produced NaN logits; refusing to sample from them")


def check_logits(logits: torch.Tensor, who: str = "model") -> None:
    if torch.isnan(logits).any():
        raise _nan_error(who)


def greedy_ids(logits: torch.Tensor, who: str = "model", argmax=None) -> torch.Tensor:
    """[..., V] logits -> [...] int64: the argmax, lowest id on ties (what sampling the greedy
    one-hot distribution returns), after the same NaN check as :func:`check_logits`.
    ``argmax``: a kernel backend's ``argmax`` extra (``KernelSet.get("argmax")``), which returns
    (ids, whether a row holds NaN) in one pass, or None where it does not fit the tensor; without
    one, torch."""
    got = None if argmax is None else argmax(logits)
    if got is None:
        check_logits(logits, who)
        return logits.float().argmax(-1)
    ids, has_nan = got
    if has_nan:
        raise _nan_error(who)
    return ids


def one_hot(ids: torch.Tensor, V: int) -> torch.Tensor:
    """[...] ids -> [..., V] fp32 one-hot rows (the greedy distribution)."""
    return torch.zeros(*ids.shape, V, device=ids.device).scatter_(-1, ids[..., None], 1.0)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams, who: str = "model", argmax=None) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature/top-k/top-p; NaN logits
    raise FloatingPointError naming ``who``. ``argmax``: as in :func:`greedy_ids`."""
    if params.greedy:
        return one_hot(greedy_ids(logits, who, argmax), logits.shape[-1])
    check_logits(logits, who)
    logits = logits.float()
    x = logits / params.temperature
    V = x.shape[-1]
    if params.top_k is not None and params.top_k < V:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th value are kept
    if params.top_p is not None and params.top_p < 1:
        x = _top_p_filter(x, params.top_p)
    return torch.softmax(x, dim=-1)


def _top_p_filter(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    p = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(p, dim=-1) - p  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first id whose cumulative mass exceeds u_i * total.

    probs [N, V] (need not be normalised), uniforms [N] in [0, 1) -> ids [N] (int64). A
    zero-probability id is never returned. Deterministic given the uniforms.
    """
    cdf = probs.double().cumsum(-1)  # [N, V]
    x = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # [N, 1]
    ids = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # first cdf > x
    over = ids >= probs.shape[-1]
    if over.any():  # u*total rounded up to total: take the last id with mass
        last = (probs > 0).long().cumsum(-1).argmax(-1)
        ids = torch.where(over, last, ids)
    return ids


SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT): a signed 64-bit value


def validate_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        validate_seed(seed)
        g.manual_seed(seed)
    return g
