"""Deliberately WRONG pairings, kept so that the exactness checker can be shown to fail
(docs/exactness.md tier 4: a test harness that cannot fail proves nothing). Never use them to
generate text.

* :class:`ArgmaxSoftQDraft`: drafts the argmax but reports q = softmax(draft logits)
  (pitfall 1; with p = [.5, .3, .2], q = [.6, .25, .15] it emits about [.83, .08, .08]).
* :class:`SharedUniformAcceptor`: uses the accept test's uniform again to sample the
  recovered/bonus token (pitfall 2): a rejection means u >= p/q, so that u is no longer uniform.
"""

from __future__ import annotations

import torch

from verispec.model.sampling import sample_categorical
from verispec.spec.drafts import ModelDraft


class ArgmaxSoftQDraft(ModelDraft):
    """Greedy draft paired with the soft q it did NOT sample from. Biased on purpose."""

    name = "argmax-softq"

    can_couple = False  # it stays the biased argmax draft whatever the acceptor

    def _choose(self, q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return q.argmax(-1)


class SharedUniformAcceptor:
    """Rejection sampling that reuses one uniform per position for accept test and resample.
    Biased on purpose."""

    lossless = False
    name = "shared-uniform"

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        u = rng.uniforms(B, max(g, 1))  # [B, max(g, 1)]: the only random numbers used
        p, q = target_probs.float(), draft_probs.float()
        idx = draft_ids.long()[..., None]
        ok = u[:, :g] * torch.gather(q, 2, idx)[..., 0] < torch.gather(p[:, :g], 2, idx)[..., 0]  # [B, g]
        accepted = torch.cumprod(ok.long(), 1).sum(1) if g else torch.zeros(B, dtype=torch.long, device=p.device)
        rows = torch.arange(B, device=p.device)
        p_a = p[rows, accepted]  # [B, V]
        if g:
            residual = (p_a - q[rows, accepted.clamp(max=g - 1)]).clamp(min=0)
            use_p = (accepted == g) | (residual.sum(-1) <= 0)
            r = torch.where(use_p[:, None], p_a, residual)
        else:
            r = p_a
        u_again = u[rows, accepted.clamp(max=u.shape[1] - 1)]  # the SAME draw as the accept test
        emitted = sample_categorical(r, u_again)
        tokens = torch.full((B, g + 1), -1, dtype=torch.long, device=p.device)
        keep = torch.arange(g, device=p.device)[None] < accepted[:, None]
        tokens[:, :g] = torch.where(keep, draft_ids.long(), tokens[:, :g])
        tokens[rows, accepted] = emitted
        return accepted, tokens


BIASED_DRAFTS = {"argmax-softq": ArgmaxSoftQDraft}
BIASED_ACCEPTORS = {"shared-uniform": SharedUniformAcceptor}
