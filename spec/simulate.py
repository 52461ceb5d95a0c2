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
- with greedy traces that carry the draft's confidences, a k-policy's drafting gate
  (``keep_drafting``) hears each draft's confidence and may end the pass early, as in the engine;
- a verify pass over k tokens costs ``verify_s * (1 + verify_slope * (k - 1))``, or
  ``verify_by_k[k - 1]`` where a measured curve is given (``calibration_by_k``: what a k-policy's
  calibration measures instead, e.g. a start taken while the machine was busy); every cost is
  multiplied by log-normal noise of ``noise`` (sigma), and each pass adds ``overhead_s``;
- with ``drift`` > 0 every cost is also multiplied by the machine's speed at that moment of the
  simulated clock: a log-normal process (sigma ``drift``, correlation time ``drift_s`` simulated
  seconds, one value a second), the same path for every policy run with the same seed, as a
  shared VM slows and speeds up under everything that runs on it.

A workload may instead carry greedy **traces** (:func:`greedy_trace`): per new token, whether the
draft's greedy choice at that point of the target's greedy text equals the target's. At
temperature 0 that fixes what every pass accepts, whatever k the policy picks (a pass accepts
drafts up to the first disagreement), so the tokens and k counts of a replay equal the engine's
(tested); only the costs are modelled. As in the engine, the first new token comes from the
target's prefill and passes make the rest. With a drafting gate the replay is a model too: a
trace holds the draft's confidence after the target's text, while in the engine the drafts that
follow a rejected one come after the draft's own text.

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
    drift: float = 0.0  # sigma of the machine's log speed over time
    drift_s: float = 20.0  # its correlation time, simulated seconds
    verify_by_k: tuple[float, ...] = ()  # seconds of a verify pass of k = 1, 2, ... tokens (replaces the slope)
    calibration_by_k: tuple[float, ...] = ()  # what a policy's calibration measures instead (a start gone wrong)

    def __post_init__(self):
        if self.draft_s < 0 or self.verify_s <= 0 or self.verify_slope < 0 or self.catch_up < 0 \
                or self.overhead_s < 0 or self.noise < 0 or self.drift < 0 or not self.drift_s > 0:
            raise ValueError(f"costs must be >= 0 (verify_s, drift_s > 0), got {self}")
        for name in ("verify_by_k", "calibration_by_k"):
            if any(not v > 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must hold seconds > 0, got {getattr(self, name)}")

    def verify(self, k: int) -> float:
        if self.verify_by_k:
            if k > len(self.verify_by_k):
                raise ValueError(f"verify_by_k gives {len(self.verify_by_k)} k's; a pass of k={k} was asked for")
            return self.verify_by_k[k - 1]
        return self.verify_s * (1 + self.verify_slope * (k - 1))


class Drift:
    """The machine's speed factor at simulated time t: exp of an Ornstein-Uhlenbeck process
    (stationary sigma ``sigma``, correlation time ``tau`` seconds) sampled once a second, drawn
    from its own seeded stream, so it depends on the time only, not on what the policy did."""

    def __init__(self, sigma: float, tau: float, seed: int):
        self.sigma, self.rho = sigma, math.exp(-1.0 / tau)
        self.rng = random.Random(f"drift-{seed}")
        self.path = [self.rng.gauss(0.0, sigma)]  # log speed at t = 0, 1, 2 ... s

    def __call__(self, t: float) -> float:
        if not self.sigma:
            return 1.0
        i = int(t)
        while len(self.path) <= i:
            x = self.path[-1]
            self.path.append(self.rho * x + math.sqrt(1 - self.rho ** 2) * self.rng.gauss(0.0, self.sigma))
        return math.exp(self.path[i])


@dataclass(frozen=True)
class Workload:
    name: str
    acceptance: tuple[float, ...]  # conditional acceptance of draft 1, 2, ...; the last entry repeats
    calls: int = 3  # generate() calls (prompts)
    new_tokens: int = 96  # tokens per call
    traces: tuple[tuple[int, ...], ...] | None = None  # per call: greedy agreement of each new token (1/0)
    confidence: tuple[tuple[float, ...], ...] | None = None  # per call: the draft's probability of each greedy draft

    def __post_init__(self):
        if self.traces is not None:
            if len(self.traces) != self.calls:
                raise ValueError(f"workload {self.name!r}: {len(self.traces)} traces for calls={self.calls}")
            for i, t in enumerate(self.traces):
                if len(t) < self.new_tokens or any(x not in (0, 1) for x in t):
                    raise ValueError(f"workload {self.name!r}: trace {i} must hold at least new_tokens="
                                     f"{self.new_tokens} values, each 0 or 1 (has {len(t)})")
            if self.confidence is not None and (
                    len(self.confidence) != self.calls or any(len(c) != len(t) for c, t in zip(self.confidence, self.traces))
                    or any(not 0.0 <= x <= 1.0 for c in self.confidence for x in c)):
                raise ValueError(f"workload {self.name!r}: confidence must hold one value in [0, 1] per trace value")
        elif self.confidence is not None:
            raise ValueError(f"workload {self.name!r}: confidence needs traces")
        elif not self.acceptance or any(not 0.0 <= a <= 1.0 for a in self.acceptance):
            raise ValueError(f"workload {self.name!r}: acceptance must be a non-empty list of values in [0, 1]")
        if self.calls < 1 or self.new_tokens < 1:
            raise ValueError(f"workload {self.name!r}: calls and new_tokens must be >= 1")

    @classmethod
    def from_traces(cls, name: str, traces, new_tokens: int | None = None, confidence=None) -> "Workload":
        """A greedy replay of ``traces`` (lists of 0/1), each call ``new_tokens`` long (default: the
        shortest); ``confidence`` (lists of floats, as traces) drives a k-policy's drafting gate."""
        traces = tuple(tuple(int(x) for x in t) for t in traces)
        if not traces:
            raise ValueError(f"workload {name!r}: no traces")
        if confidence is not None:
            confidence = tuple(tuple(float(x) for x in c) for c in confidence)
        n = min(len(t) for t in traces) if new_tokens is None else new_tokens
        return cls(name, (), calls=len(traces), new_tokens=n, traces=traces, confidence=confidence)

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
    speed, clock = Drift(costs.drift, costs.drift_s, seed), [0.0]  # simulated seconds so far

    def noisy(seconds: float) -> float:
        seconds *= speed(clock[0])
        return seconds * math.exp(rng.gauss(0.0, costs.noise)) if costs.noise else seconds

    if hasattr(policy, "needs_calibration") and policy.needs_calibration(1):
        calibration = (lambda k: costs.calibration_by_k[k - 1]) if costs.calibration_by_k else costs.verify
        policy.calibrate(lambda k: noisy(calibration(k)), batch=1)
    outcomes = []
    for w in workloads:
        out = Outcome(w.name)
        gate = getattr(policy, "keep_drafting", None) if w.confidence is not None else None
        if hasattr(policy, "set_gated"):
            policy.set_gated(gate is not None)
        for call in range(w.calls):
            if hasattr(policy, "begin_sequence"):
                policy.begin_sequence()
            hole, left = 0, w.new_tokens
            if w.traces is not None:  # the prefill makes the first token, as in the engine
                trace, left = w.traces[call], w.new_tokens - 1
                out.tokens += 1
            while left > 0:
                k = policy.next_k()
                if not 1 <= k <= policy.max_k:
                    raise ValueError(f"k-policy returned k={k} outside 1..{policy.max_k}")
                g = min(k - 1, left - 1)
                if gate is not None:  # the draft reports each draft's confidence; the gate may stop it
                    done = w.new_tokens - left
                    for i in range(g):
                        if not gate(torch.tensor([w.confidence[call][done + i]])) and i < g - 1:
                            g = i + 1
                            break
                draft_s = 0.0
                if g:
                    draft_s = noisy(costs.draft_s * (1 + costs.catch_up * hole)) + sum(
                        noisy(costs.draft_s) for _ in range(g - 1))
                accepted = 0
                if w.traces is not None:
                    done = w.new_tokens - left  # the pass's drafts are new tokens done .. done + g - 1
                    while accepted < g and trace[done + accepted]:
                        accepted += 1
                else:
                    while accepted < g and rng.random() < w.alpha(accepted):
                        accepted += 1
                hole = hole + 1 if not g else (1 if accepted == g else 0)
                verify_s = noisy(costs.verify(g + 1))
                policy.observe(g + 1, torch.tensor([accepted]), draft_s, verify_s)
                out.tokens += accepted + 1
                out.seconds += draft_s + verify_s + costs.overhead_s
                clock[0] += draft_s + verify_s + costs.overhead_s
                out.k_counts[g + 1] = out.k_counts.get(g + 1, 0) + 1
                left -= accepted + 1
        outcomes.append(out)
    return outcomes


def greedy_trace(target, draft, prompt: torch.Tensor, new_tokens: int, confidence: bool = False):
    """For ``prompt`` [L]: the target's greedy continuation of ``new_tokens`` tokens, and for each new
    token 1 if the draft's greedy choice after the same prefix is that token, else 0. Both are
    :class:`~verispec.model.LlamaForSampling`-like (``sample`` and ``forward(ids, positions, logits_at)``);
    the draft scores the whole text in one forward. ``confidence=True`` returns (trace, confidences):
    also the draft's softmax probability of its greedy choice at each token, what the engine's
    draft reports to a drafting gate (there after the prefix the draft itself proposed; here after
    the target's, the same wherever the earlier drafts of a pass were accepted)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    L = len(prompt)
    text = target.sample(prompt[None], L + new_tokens, temperature=0)[0]  # [L + N]
    at = torch.arange(L - 1, L + new_tokens - 1)[None]  # [1, N]: the positions that predict each new token
    logits = draft.forward(text[None], torch.zeros(1, dtype=torch.long), logits_at=at)[0].float()  # [N, V]
    trace = (logits.argmax(-1).cpu() == text[L:]).int().tolist()
    if not confidence:
        return trace
    return trace, logits.softmax(-1).amax(-1).cpu().tolist()


# ---- a flat verify-cost curve (an accelerator's), for measured configurations ------------------------

FLAT_TOKENS = 64  # tokens one verify pass may score at the cost of a one-token decode step


def flat_verify_cost(tokens_verified: int, flat: int = FLAT_TOKENS) -> float:
    """A verify pass's cost in one-token target decode steps on an accelerator-like curve: flat
    (1 step) up to ``flat`` tokens scored in the pass, then growing in proportion (compute-bound)."""
    if tokens_verified < 1 or flat < 1:
        raise ValueError(f"tokens_verified and flat must be >= 1, got {tokens_verified}, {flat}")
    return max(1.0, tokens_verified / flat)


def predicted_speedup_flat(tokens_per_pass: float, c: float, levels: float, verify_cost: float = 1.0) -> float:
    """Speedup over target-only decoding of a configuration whose tokens per pass were measured,
    when a pass costs ``c`` decode steps per drafted level (``levels`` a pass: k - 1 for a chain,
    the depth for a tree; one draft forward per level, whatever the level's width) plus
    ``verify_cost`` decode steps for the verify pass (1 on the flat curve):
    tokens_per_pass / (c * levels + verify_cost). Bookkeeping between passes is not in it."""
    if tokens_per_pass < 1 or c < 0 or levels < 0 or verify_cost <= 0:
        raise ValueError(f"need tokens_per_pass >= 1, c >= 0, levels >= 0, verify_cost > 0; got {tokens_per_pass}, "
                         f"{c}, {levels}, {verify_cost}")
    return tokens_per_pass / (c * levels + verify_cost)
