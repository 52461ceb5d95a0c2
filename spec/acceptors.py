"""Token acceptors: decide, per row, how many drafts to keep and which token to emit after them.

The protocol (``verispec.spec.protocols.Acceptor``; any callable with this signature works, and
may carry the optional members there)::

    acceptor(draft_ids,     # [B, g] int64: the drafts x_1..x_g (g = k - 1 >= 0)
             draft_probs,   # [B, g, V] fp32: q, the distribution each draft was SAMPLED from
             target_probs,  # [B, g + 1, V] fp32: p at the k verify positions
             rng)           # AcceptorRandomness: independent uniforms / exponentials streams
      -> (accepted,         # [B] int64 in 0..g
          tokens)           # [B, g + 1] int64: accepted drafts, then one emitted token, then -1

``tokens[b, :a]`` must equal ``draft_ids[b, :a]`` (a = accepted[b]): those drafts are already
in the target's cache. ``lossless = True`` claims the output distribution equals target-only
sampling (docs/exactness.md); the test suite checks every acceptor that claims it.
``accepts_greedy_ids``: at temperature 0 the loop may call ``accept_greedy(draft_ids, choice)``
with the target's argmax ids instead (the stock rejection sampler and GreedyTokenAcceptor).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .block import BlockAcceptor
from .coupled import race as _race
from .protocols import AcceptorBase
from .rejection import rejection_sample

log = logging.getLogger("verispec.spec")


def _emit_after_prefix(
    draft_ids: torch.Tensor,  # [B, g]
    accepted: torch.Tensor,  # [B]
    emitted: torch.Tensor,  # [B]
) -> torch.Tensor:  # [B, g + 1]: accepted drafts, emitted token, -1 padding
    B, g = draft_ids.shape
    tokens = torch.full((B, g + 1), -1, dtype=torch.long, device=draft_ids.device)
    keep = torch.arange(g, device=draft_ids.device)[None] < accepted[:, None]  # [B, g]
    tokens[:, :g] = torch.where(keep, draft_ids.long(), tokens[:, :g])
    tokens[torch.arange(B, device=draft_ids.device), accepted] = emitted
    return tokens


def _prefix_length(ok: torch.Tensor) -> torch.Tensor:  # ok [B, g] bool -> [B] length of the all-True prefix
    if ok.shape[1] == 0:
        return torch.zeros(ok.shape[0], dtype=torch.long, device=ok.device)
    return torch.cumprod(ok.long(), dim=1).sum(dim=1)


class DefaultTokenAcceptor(AcceptorBase):
    """Exact rejection sampling (Leviathan et al. 2023; Chen et al. 2023), the default.

    Computes through :func:`verispec.spec.rejection.rejection_sample`, or through a backend's
    ``accept_reject`` kernel with the same signature and decisions (chosen once, at
    construction: see :meth:`for_target`).

    At temperature 0, rejection sampling of a one-hot q against a one-hot p accepts draft i iff it
    is the target's argmax and then emits the argmax: ``accept_greedy`` decides from the ids alone,
    skipping the [B, k, V] distributions and the random numbers (a [B, V] race draw). Only with the
    stock kernel: a backend's or a user's kernel, or a subclass (it may change the rule; it opts
    in by overriding ``accepts_greedy_ids``), is still called.
    """

    lossless = True
    name = "default"

    def __init__(self, kernel: Callable | None = None):
        self.kernel = kernel if kernel is not None else rejection_sample

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is DefaultTokenAcceptor and self.kernel is rejection_sample

    @classmethod
    def for_target(cls, target) -> "DefaultTokenAcceptor":
        """Use the target's kernel backend's ``accept_reject`` kernel when it has one."""
        kernels = getattr(target, "kernels", None)
        kernel = kernels.get("accept_reject") if kernels is not None and hasattr(kernels, "get") else None
        if kernel is not None:
            log.info("DefaultTokenAcceptor uses backend %r's accept_reject kernel", getattr(kernels, "name", "?"))
        return cls(kernel)

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        uniforms = rng.uniforms(B, g)  # [B, g] accept stream
        exponentials = rng.exponentials(B, target_probs.shape[-1])  # [B, V] race stream
        return self.kernel(draft_ids, draft_probs, target_probs, uniforms, exponentials)


class GreedyTokenAcceptor(AcceptorBase):
    """Deterministic: keep drafts while they equal the target's argmax, then emit the argmax.

    The output is the target's GREEDY decode whatever the temperature, so it is target-only
    sampling only at temperature 0: not lossless in general. At temperature 0 the loop hands it
    the argmax ids (``accept_greedy``) instead of one-hot distributions; a subclass opts in.
    """

    lossless = False
    exact_when_greedy = True  # at temperature 0 it is target-only greedy decoding
    name = "greedy"

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is GreedyTokenAcceptor

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        return accept_by_ids(draft_ids, target_probs.argmax(-1))  # lowest id on ties, as logits_to_probs


def accept_by_ids(draft_ids: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match decisions against the target's chosen ids ``choice`` [B, g + 1] (its argmax, or its
    samples): keep the drafts up to the first that differs from ``choice``, then emit ``choice``
    there -> (accepted [B], tokens [B, g + 1]). With the argmax this is also what rejection
    sampling decides at temperature 0 (one-hot q and p)."""
    g = draft_ids.shape[1]
    if g == 0:  # no drafts (k = 1, and every first token after a prompt): emit the choice
        return torch.zeros(len(choice), dtype=torch.long, device=choice.device), choice.long()
    accepted = _prefix_length(draft_ids == choice[:, :g])
    return accepted, _emit_after_prefix(draft_ids, accepted, choice.gather(1, accepted[:, None])[:, 0])


class SampleMatchAcceptor(AcceptorBase):
    """Sample the target at every verify position; keep drafts while they equal those samples.

    The emitted tokens are always the target's own samples (each from p given the accepted
    prefix, on a stream the draft never sees), so the output is exact for ANY draft. It is the
    natural rule for a deterministic draft (n-gram, argmax), where it accepts x with
    probability p(x), as rejection sampling with a one-hot q does.
    """

    lossless = True
    name = "sample-match"

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        return accept_by_ids(draft_ids, _race(target_probs, rng.exponentials(B, g + 1, target_probs.shape[-1])))


class CoupledAcceptor(AcceptorBase):
    """Sample-and-match on position-keyed noise (coupled.py): the token at position t is
    argmax_v p_t(v) / E[row, t, v], with E a fixed function of (seed, row, t, v), and drafts are
    kept while they equal those tokens. A draft that samples with the same noise (model and
    layer-skip drafts do, when the generator hands them ``noise``) proposes argmax q_t / E[t],
    which matches with probability >= (1 - TV) / (1 + TV) for TV = TV(p_t, q_t).

    Exact for any draft, and more: the output is the target-only race sampling of that noise,
    so for a given seed the text does not depend on k, the k-policy or the draft. The price is
    acceptance: rejection sampling (the default) matches with probability 1 - TV.
    """

    lossless = True
    coupled = True  # the generator gives drafts the positional noise
    name = "coupled"

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        g = draft_ids.shape[1]
        return accept_by_ids(draft_ids, _race(target_probs, rng.positional_exponentials(g + 1)))  # [B, g + 1] samples


class TypicalAcceptor(AcceptorBase):
    """LOSSY typical acceptance (Medusa, Cai et al. 2024): accept draft x while
    p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))); then sample one token from p
    at the first unaccepted position. Faster acceptance, but the output is NOT distributed as
    target-only sampling; opt-in only.
    """

    lossless = False
    name = "typical"

    def __init__(self, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3):
        if not 0 < posterior_threshold <= 1 or not 0 < posterior_alpha <= 1:
            raise ValueError(
                f"posterior_threshold and posterior_alpha must be in (0, 1], got {posterior_threshold}, {posterior_alpha}"
            )
        self.posterior_threshold = posterior_threshold
        self.posterior_alpha = posterior_alpha

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        p = target_probs.float()
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, g + 1]
        threshold = torch.clamp(self.posterior_alpha * torch.exp(-entropy), max=self.posterior_threshold)
        p_x = p[:, :g].gather(2, draft_ids.long()[..., None])[..., 0]  # [B, g]
        accepted = _prefix_length(p_x > threshold[:, :g])
        p_a = p[torch.arange(B, device=p.device), accepted]  # [B, V]
        emitted = _race(p_a, rng.exponentials(B, p.shape[-1]))
        return accepted, _emit_after_prefix(draft_ids, accepted, emitted)


ACCEPTORS = {
    "default": DefaultTokenAcceptor,
    "greedy": GreedyTokenAcceptor,
    "sample-match": SampleMatchAcceptor,
    "coupled": CoupledAcceptor,
    "typical": TypicalAcceptor,
    "block": BlockAcceptor,
}
