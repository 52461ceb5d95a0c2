"""Simulate a k-policy against a cost and acceptance model, without running any model.

A researcher changing :class:`~verispec.spec.policy.AdaptiveK` (or writing a new k-policy) can
see in milliseconds how it compares with every fixed k on workloads that change under it (code
then prose, greedy then sampled), with the same protocol the generator drives: ``calibrate``
once, ``begin_sequence`` at every call, ``next_k`` before each pass, ``observe`` after it.

The model follows the generator and :class:`~verispec.spec.drafts.ModelDraft` step by step:

- a pass at k proposes g = min(k - 1, tokens still wanted - 1) drafts; draft i is accepted with
  probability ``acceptance[i]`` given drafts 1..i-1 were (the last entry repeats for deeper
  drafts), and the pass commits accepted + 1 tokens;
- the draft's cache has a hole after a pass that accepted all its drafts (one token) and after
  every k = 1 pass (one more token each); the next pass with drafts feeds the hole in its first
  draft forward, which costs ``draft_s * (1 + catch_up * hole)``;
- a verify pass over k tokens costs ``verify_s * (1 + verify_slope * (k - 1))``; every cost is
  multiplied by log-normal noise of ``noise`` (sigma), and each pass adds ``overhead_s``.

It is a model, not a measurement: the costs of a real pair come from ``verispec bench decode`` and
``bench e2e`` (``bench/results/``), and only a real run shows real tokens per second.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from .policy import as_policy


@dataclass(frozen=True)
class Costs:
    draft_s: float  # one draft forward over one token
    verify_s: float  # one target forward over one token
    verify_slope: float = 0.1  # extra verify cost per extra token, relative to verify_s
    catch_up: float = 0.15  # extra draft-forward cost per token of the draft's cache hole, relative to draft_s
    overhead_s: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if self.draft_s < 0 or self.verify_s <= 0 or self.verify_slope < 0 or self.catch_up < 0 \
                or self.overhead_s < 0 or self.noise < 0:
            raise ValueError(f"costs must be >= 0 (verify_s > 0), got {self}")

    def verify(self, k: int) -> float:
        return self.verify_s * (1 + self.verify_slope * (k - 1))


@dataclass(frozen=True)
class Workload:
    name: str
    acceptance: tuple[float, ...]  # conditional acceptance of draft 1, 2, ...; the last entry repeats
    calls: int = 3  # generate() calls (prompts)
    new_tokens: int = 96  # tokens per call

    def __post_init__(self):
        if not self.acceptance or any(not 0.0 <= a <= 1.0 for a in self.acceptance):
            raise ValueError(f"workload {self.name!r}: acceptance must be a non-empty list of values in [0, 1]")
        if self.calls < 1 or self.new_tokens < 1:
            raise ValueError(f"workload {self.name!r}: calls and new_tokens must be >= 1")

    def alpha(self, i: int) -> float:  # draft i + 1
        return self.acceptance[min(i, len(self.acceptance) - 1)]


@dataclass
class Outcome:
    workload: str
    tokens: int = 0
    seconds: float = 0.0
    k_counts: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def simulate(policy, workloads: list[Workload], costs: Costs, seed: int = 0) -> list[Outcome]:
    """Drive ``policy`` (a k-policy or anything ``as_policy`` takes) through ``workloads`` in order,
    one policy for all of them (as one engine serving them in turn); one :class:`Outcome` each."""
    policy = as_policy(policy)
    rng = random.Random(seed)

    def noisy(seconds: float) -> float:
        return seconds * math.exp(rng.gauss(0.0, costs.noise)) if costs.noise else seconds

    if hasattr(policy, "needs_calibration") and policy.needs_calibration(1):
        policy.calibrate(lambda k: noisy(costs.verify(k)), batch=1)
    outcomes = []
    for w in workloads:
        out = Outcome(w.name)
        for _ in range(w.calls):
            if hasattr(policy, "begin_sequence"):
                policy.begin_sequence()
            hole, left = 0, w.new_tokens
            while left > 0:
                k = policy.next_k()
                if not 1 <= k <= policy.max_k:
                    raise ValueError(f"k-policy returned k={k} outside 1..{policy.max_k}")
                g = min(k - 1, left - 1)
                draft_s = 0.0
                if g:
                    draft_s = noisy(costs.draft_s * (1 + costs.catch_up * hole)) + sum(
                        noisy(costs.draft_s) for _ in range(g - 1))
                accepted = 0
                while accepted < g and rng.random() < w.alpha(accepted):
                    accepted += 1
                hole = hole + 1 if not g else (1 if accepted == g else 0)
                verify_s = noisy(costs.verify(g + 1))
                policy.observe(g + 1, torch.tensor([accepted]), draft_s, verify_s)
                out.tokens += accepted + 1
                out.seconds += draft_s + verify_s + costs.overhead_s
                out.k_counts[g + 1] = out.k_counts.get(g + 1, 0) + 1
                left -= accepted + 1
        outcomes.append(out)
    return outcomes
