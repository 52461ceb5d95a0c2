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
