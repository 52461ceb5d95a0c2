"""Speculation-length policies: how many tokens (k) the target scores in the next verify pass.

The loop asks ``policy.next_k()`` before every step and reports the step back with
``policy.observe(...)``, so a policy may change k from one step to the next (e.g. from
measured costs and online acceptance). Any k keeps the output exact, provided it is chosen
before the step's random numbers are drawn, which the loop guarantees.
"""

from __future__ import annotations

import torch


class FixedK:
    """The same k for every step (the seed API's ``k``)."""

    def __init__(self, k: int):
        validate_k(k)
        self.k = k
        self.max_k = k

    def next_k(self) -> int:
        return self.k

    def observe(self, k: int, accepted: torch.Tensor, draft_s: float, target_s: float) -> None:
        """Step report: the k used, per-row accepted drafts [B], and the step's draft/target seconds."""

    def __repr__(self) -> str:
        return f"FixedK({self.k})"


def validate_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int (tokens scored per verify pass), got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (k = 1 is plain target decoding), got {k}")


def as_policy(k) -> "FixedK":
    """An int becomes :class:`FixedK`; an object with ``next_k``/``observe``/``max_k`` is used as is."""
    if hasattr(k, "next_k") and hasattr(k, "max_k"):
        validate_k(k.max_k)
        return k
    return FixedK(k)
