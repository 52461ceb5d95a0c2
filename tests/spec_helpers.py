"""Helpers shared by the speculative-decoding tests."""

from __future__ import annotations

import torch


class FixedRandomness:
    """An acceptor random source that hands out the given numbers (tests choose every draw)."""

    def __init__(self, uniforms=None, exponentials=None):
        self._u = None if uniforms is None else torch.as_tensor(uniforms, dtype=torch.float32)
        self._e = None if exponentials is None else torch.as_tensor(exponentials, dtype=torch.float32)
        self.calls = []

    def uniforms(self, *shape):
        self.calls.append(("uniforms", shape))
        assert self._u is not None and tuple(self._u.shape) == shape, (shape, None if self._u is None else self._u.shape)
        return self._u.clone()

    def exponentials(self, *shape):
        self.calls.append(("exponentials", shape))
        assert self._e is not None and tuple(self._e.shape) == shape, (shape, None if self._e is None else self._e.shape)
        return self._e.clone()


def probs(*rows) -> torch.Tensor:
    """probs([.5, .3, .2], [...]) -> [1, n, V] fp32 (one batch row)."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32)[None]


class CountingAcceptor:
    """An exact acceptor written outside the library (rejection sampling) that counts its calls:
    what a research user would pass to ``verispec check --acceptor module:attr``."""

    lossless = True
    name = "counting"
    calls = 0

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        from verispec.spec import rejection_sample

        type(self).calls += 1
        B, g = draft_ids.shape
        return rejection_sample(draft_ids, draft_probs, target_probs, rng.uniforms(B, g),
                                rng.exponentials(B, target_probs.shape[-1]))


# Samples per exactness run (tiers 3 and 4, one batch), sized by the power the checker needs.
# The weakest deliberately biased pairing the harness must catch is the argmax draft with a soft
# q at k = 4, temperature 0.5 (V = 5, L = 3; total variation ~0.014 from the target): its
# chi-square noncentrality is lambda = n * sum_x (p_biased(x) - p(x))^2 / p(x) ~= 0.009 n
# (measured as chi2 - dof: 928.8 - 31 at n = 100,000; 383.8 - 25 at n = 40,000). Its test asks
# for p < 1e-30 (the verdict threshold is 1e-6); with ~25 pooled bins the chi-square value at
# p = 1e-30 is ~208, and at n = 40,000 the statistic's mean, dof + lambda ~384, lies 4.6 standard
# deviations (sd = sqrt(2 (dof + 2 lambda)) ~38.5) above it, where 30,000 samples leave 2.6 sd
# and 35,000 leave 3.7 sd: 40,000 is the smallest round count with a wide margin. Every other
# biased pairing has lambda / n from 0.07 (argmax draft at k = 2) to 1000 (a stale cache slot),
# caught by orders of magnitude more. The exact pairings run at the same n: the verdict there
# fails (p < 1e-6, with 25-100 bins) once lambda > ~50-80, i.e. for any deviation with
# lambda / n above ~2e-3, under a quarter of the weakest planted bias's.
EXACTNESS_SAMPLES = 40_000
