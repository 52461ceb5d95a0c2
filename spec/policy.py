"""Speculation-length policies: how many tokens (k) the target scores in the next verify pass.

The loop asks ``policy.next_k()`` before every step and reports the step back with
``policy.observe(...)``, so a policy may change k from one step to the next (e.g. from
measured costs and online acceptance). Any k keeps the output exact, provided it is chosen
before the step's random numbers are drawn, which the loop guarantees: k only decides how many
drafts are proposed, never how a draft is judged.

``k="auto"`` (or ``"auto:MAX"``) is :class:`AdaptiveK`. The protocol, with the optional hooks
(calibration, the drafting gate), is ``verispec.spec.protocols.KPolicy``.
"""

from __future__ import annotations

import time

import torch

from .protocols import KPolicyBase
from .verify_costs import VerifyCosts


class FixedK(KPolicyBase):
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


class AdaptiveK(KPolicyBase):
    """Choose k each step to maximise expected committed tokens per second.

    For each candidate k (1 .. max_k), with g = k - 1 drafts:

        E(k) = 1 + sum_{j=1..g} prod_{i=1..j} alpha_i        expected tokens per row and pass
        T(k) = g * draft_s_per_position + verify_s(k) + step_overhead_s
        k*   = argmax E(k) / T(k)

    alpha_i is the online acceptance of draft i given drafts 1..i-1 were accepted (counts
    decayed with a half-life of ``halflife`` steps, so it follows a change of prompt or topic,
    each position shrunk towards the pooled rate so a position seldom reached is not guessed
    from a handful of passes). With a constant alpha, E(k)/T(k) is Leviathan et al.'s speedup
    formula (docs/design.md); per-position rates let it follow acceptance that falls with depth.

    verify_s(k) is measured (:class:`~verispec.spec.verify_costs.VerifyCosts`): once per batch
    size the generator times a target forward of every k in 1..max_k (``calibrate``: the shape),
    then every verify pass the loop runs moves the machine's level (the last
    ``verify_level_window`` passes) and its k's shape factor (each pass of k against the passes
    of other k's around it, over the last ``verify_window`` passes), so a k is priced at the
    machine's speed now, not at the speed of the moments it happened to run; the table is
    non-decreasing in k. The draft cost per drafted position
    and the per-step overhead (acceptance test, bookkeeping) are averaged online; until the first
    step has measured them the policy uses ``start_k``.

    The draft cost is learned from passes whose first draft forward fed one token (or, after a
    pass that accepted every draft, two). After k = 1 passes the draft has skipped tokens and the
    next pass feeds them all in its first forward; that pass is not a per-position cost (taken as
    one, it made drafting look dear, which kept the policy at k = 1: 82 of 132 greedy-code passes
    in one measured run).

    At the start of every generate() call (``begin_sequence``) the acceptance counts are scaled by
    ``carry`` and then, if more remain, down to ``carry_cap`` row-passes at the most-observed
    position (default 1 and 4): a new prompt starts from what the last ones taught (not from the
    prior), but its own first passes outweigh it. Keeping everything (``carry_cap=inf``), a policy
    that had learnt code prompts used k = 8 in 14 of 99 greedy-prose passes (measured); starting
    from the prior (``carry=0``) costs the first passes of every call. ``spec/simulate.py`` compares
    the settings on modelled workloads (README). The verify-cost table and the draft cost are
    always kept.

    **Drafting gate** (``gate=True``, with a draft that can stop early: a model or ``self:N``
    draft). When the formula's best k is above 1, the pass may go up to ``max_k`` and the draft
    reports, after each draft j, its own probability c_j of that draft (softmax at temperature 1);
    ``keep_drafting`` then re-solves the same argmax with what is now known: the chance that drafts
    1..j are all accepted is prod alpha(c_i), alpha(c) the online acceptance of drafts whose
    confidence fell in c's bin (``conf_bins`` equal bins on [0, 1], decayed like the position
    counts, shrunk by ``conf_shrink`` row-drafts towards the pooled rate), and deeper drafts still
    get the per-position alpha_i. It drafts one more if some k > j + 1 then beats stopping at
    j + 1 (rows summed: all rows share the pass). Exact, as any k is: the decision about draft
    j + 1 depends only on drafts 1..j. On greedy traces of the Qwen pair (README) it ends a pass
    at a draft the draft model is unsure of and runs on through confident stretches, which no
    fixed k can do.

    Under the gate, a pass length one or two above the formula's best k that no pass has verified
    for ``4 * explore_every`` steps is run once, exactly (the gate holds that pass to it; at most one
    such pass every ``explore_every`` steps), so its verify cost is measured, not left at a
    calibration that may be wrong. Exact like any stop: the length is fixed before the pass.

    When the best k has not been followed by a step at k + 1 for ``explore_every`` steps (when
    the best k is 1, ``explore_from_1`` steps), it takes k + 1 once: otherwise a policy that settled
    on k = 1 (no drafts, so nothing learnt about acceptance) would never again measure acceptance,
    and one that settled on k would never learn that draft k + 1 improved.
    """

    def __init__(self, max_k: int = 8, start_k: int = 4, halflife: float = 24.0, prior_acceptance: float = 0.6,
                 prior_strength: float = 2.0, shrink: float = 4.0, cost_smoothing: float = 0.2,
                 explore_every: int = 8, explore_from_1: int = 2, carry: float = 1.0, carry_cap: float = 4.0,
                 gate: bool = True, conf_bins: int = 8, conf_shrink: float = 1.0, verify_window: int = 128,
                 verify_prior: float = 2.0, calibration_rounds: int = 3, verify_level_window: int = 16):
        validate_k(max_k)
        if conf_bins < 1 or conf_shrink < 0:
            raise ValueError(f"conf_bins must be >= 1 and conf_shrink >= 0, got {conf_bins}, {conf_shrink}")
        validate_k(start_k)
        if not 0.0 <= prior_acceptance <= 1.0:
            raise ValueError(f"prior_acceptance must be in [0, 1], got {prior_acceptance}")
        if halflife <= 0 or prior_strength < 0 or shrink < 0 or not 0.0 < cost_smoothing <= 1.0:
            raise ValueError("halflife must be > 0, prior_strength and shrink >= 0, cost_smoothing in (0, 1]")
        if not 0.0 <= carry <= 1.0:
            raise ValueError(f"carry must be in [0, 1], got {carry}")
        if not carry_cap >= 0:
            raise ValueError(f"carry_cap must be >= 0, got {carry_cap}")
        if explore_every < 1 or explore_from_1 < 1:
            raise ValueError(f"explore_every and explore_from_1 must be >= 1, got {explore_every}, {explore_from_1}")
        self.carry = carry
        self.carry_cap = carry_cap
        self.max_k = max_k
        self.start_k = min(start_k, max_k)
        self.decay = 0.5 ** (1.0 / halflife)
        self.prior = (prior_acceptance, prior_strength)
        self.shrink = shrink
        self.smoothing = cost_smoothing
        self.reached = [0.0] * (max_k - 1)  # decayed row-passes where draft i+1 was judged
        self.kept = [0.0] * (max_k - 1)  # ... and accepted
        self.costs = VerifyCosts(verify_window, verify_prior, calibration_rounds, verify_level_window)  # seconds per k
        self.calibrated_batch: int | None = None
        self.draft_s_per_position: float | None = None
        self.overhead_s = 0.0
        self.explore_every = explore_every
        self.explore_from_1 = explore_from_1
        self._step = 0
        self._last_used: dict[int, int] = {}  # k -> step it was last chosen
        self._verified: dict[int, int] = {}  # k -> step of the last pass that verified k tokens
        self._explored_at = 0  # step of the last gated pass held to a stale length
        self._asked_at: float | None = None
        self._drafted_last = True  # whether the previous pass ran the draft (a k = 1 pass does not)
        self.last_choice: dict | None = None  # E, T and rate of every k at the last decision
        self.gate = gate
        self.conf_shrink = conf_shrink
        self.conf_reached = torch.zeros(conf_bins, dtype=torch.float64)  # decayed drafts judged, per confidence bin
        self.conf_kept = torch.zeros(conf_bins, dtype=torch.float64)  # ... and accepted
        self._gated = False  # set by the generator: the draft reports confidences, the gate may stop it
        self._pass: dict | None = None  # the running pass's gate state

    # ---- calibration (called by the generator) --------------------------------------------------

    def needs_calibration(self, batch: int) -> bool:
        return self.calibrated_batch != batch

    def calibrate(self, time_verify, batch: int, largest_k: int | None = None) -> None:
        """``time_verify(k) -> seconds`` of one target forward over k tokens, for k = 1..max_k (see
        :class:`VerifyCosts`)."""
        self.costs.calibrate(time_verify, list(range(1, min(self.max_k, largest_k or self.max_k) + 1)))
        self.calibrated_batch = batch

    # ---- the policy protocol --------------------------------------------------------------------

    def begin_sequence(self) -> None:
        """A new generate() call: keep ``carry`` of the acceptance evidence, at most ``carry_cap``
        row-passes at any position (costs are kept)."""
        scale = self.carry
        most = max(self.reached, default=0.0) * scale
        if most > self.carry_cap:
            scale *= self.carry_cap / most
        self.reached = [r * scale for r in self.reached]
        self.kept = [k * scale for k in self.kept]
        self._pass = None

    def next_k(self) -> int:
        self._asked_at = time.perf_counter()
        self._pass = None
        if self.draft_s_per_position is None or not self.costs:
            return self.start_k
        alphas = self.position_acceptance()
        verify = self._verify_table()
        best_k, best_rate, table = 1, -1.0, {}
        expected, run = 1.0, 1.0
        for k in range(1, self.max_k + 1):
            if k > 1:
                run *= alphas[k - 2]
                expected += run
            seconds = (k - 1) * self.draft_s_per_position + verify[k] + self.overhead_s
            rate = expected / seconds
            table[k] = {"expected_tokens": expected, "seconds": seconds, "tokens_per_s": rate}
            if rate > best_rate:
                best_k, best_rate = k, rate
        self.last_choice = table
        self._step += 1
        if self.gate and self._gated and best_k > 1:  # the gate decides how far this pass drafts
            self._start_pass(alphas, verify, self._stale_length(best_k))
            self._last_used[self.max_k] = self._step
            return self.max_k
        every = self.explore_every if best_k > 1 else self.explore_from_1
        if best_k < self.max_k and self._step - self._last_used.get(best_k + 1, 0) > every:
            best_k += 1  # now and then one k further, so the next position's acceptance and cost stay measured
        self._last_used[best_k] = self._step
        return best_k

    # ---- the drafting gate ----------------------------------------------------------------------

    def set_gated(self, gated: bool) -> None:
        """The generator says whether the draft reports confidences (``keep_drafting``) this run."""
        self._gated = bool(gated)

    def confidence_acceptance(self) -> torch.Tensor:
        """[conf_bins] acceptance of a draft by its confidence bin, shrunk towards the pooled rate."""
        pooled = self._pooled_acceptance()
        return (self.conf_kept + self.conf_shrink * pooled) / (self.conf_reached + self.conf_shrink).clamp(min=1e-12)

    def _bins(self, conf: torch.Tensor) -> torch.Tensor:
        """Confidence bin of each value of ``conf`` (equal bins on [0, 1])."""
        n = len(self.conf_reached)
        return (conf * n).long().clamp(max=n - 1)

    def _stale_length(self, best_k: int) -> int | None:
        """A pass length of ``best_k`` + 1 or + 2 not verified for ``4 * explore_every`` steps, the least
        recently verified (at most one such pass every ``explore_every`` steps), or None.

        The gate prices a longer pass from the verify table; a length it never reaches keeps its
        calibration, however wrong (measured: a start whose calibration put k = 7 and 8 at 1.2x and
        1.36x k = 6, where fixed-k paths paid 0.96-1.06x, and k=auto never ran them)."""
        if self._step - self._explored_at < self.explore_every:
            return None
        near = range(best_k + 1, min(best_k + 2, self.max_k) + 1)  # lengths the gate may pick; farther ones seldom pay
        stale = [k for k in near if self._step - self._verified.get(k, 0) > 4 * self.explore_every]
        if not stale:
            return None
        self._explored_at = self._step
        return min(stale, key=lambda k: (self._verified.get(k, 0), -k))

    def _start_pass(self, alphas: list[float], verify: dict[int, float], length: int | None = None) -> None:
        self._pass = {"alphas": alphas, "verify": verify, "by_conf": self.confidence_acceptance(),
                      "confs": [], "p": None, "accepted": 0.0, "length": length}

    def keep_drafting(self, conf: torch.Tensor) -> bool:
        """After draft j (``conf`` [B]: each row's draft probability): draft one more?"""
        ps = self._pass
        if ps is None:  # not a gated pass (the policy chose k itself): draft on to k
            return True
        conf = conf.double().clamp(0.0, 1.0)
        ps["confs"].append(conf)
        if ps["length"] is not None:  # held to a stale length: exactly that many tokens
            return len(ps["confs"]) + 1 < ps["length"]
        p = ps["by_conf"][self._bins(conf)] * (1.0 if ps["p"] is None else ps["p"])  # [B] P(drafts 1..j all accepted)
        ps["p"] = p
        ps["accepted"] += float(p.sum())  # expected accepted drafts so far, rows summed
        j, d, o, verify, alphas = len(ps["confs"]), self.draft_s_per_position, self.overhead_s, ps["verify"], ps["alphas"]
        expected = len(conf) + ps["accepted"]  # every row also commits one token of the target's
        now = expected / (j * d + verify[j + 1] + o)
        run, reach = 1.0, float(p.sum())
        for m in range(j + 1, self.max_k):  # m drafts in all
            run *= alphas[m - 1]
            expected += reach * run
            if expected / (m * d + verify[m + 1] + o) > now:
                return True
        return False

    def _learn_confidence(self, accepted: torch.Tensor) -> None:
        """Per confidence bin: drafts judged (up to the first rejected) and accepted, this pass."""
        ps, self._pass = self._pass, None
        if ps is None or not ps["confs"]:
            return
        self.conf_reached *= self.decay
        self.conf_kept *= self.decay
        confs = torch.stack(ps["confs"], 1)  # [B, j]
        at = torch.arange(confs.shape[1])[None]
        a = accepted.long().cpu()[:, None]
        bins = self._bins(confs)
        self.conf_reached.index_add_(0, bins[at <= a], torch.ones(int((at <= a).sum()), dtype=torch.float64))
        self.conf_kept.index_add_(0, bins[at < a], torch.ones(int((at < a).sum()), dtype=torch.float64))

    def observe(self, k: int, accepted: torch.Tensor, draft_s: float, target_s: float) -> None:
        self._learn_confidence(accepted)
        g = k - 1
        self._decay_acceptance()
        counts = torch.bincount(accepted.long().cpu(), minlength=g + 1).tolist()  # [g + 1]
        at_least = 0
        for a in range(g, 0, -1):  # row-passes that accepted >= a drafts
            at_least += counts[a]
            self.kept[a - 1] += at_least
        for i in range(g):
            self.reached[i] += sum(counts[i:])
        self._observe_costs(k, g, draft_s, target_s)

    def _decay_acceptance(self) -> None:
        for i in range(len(self.reached)):  # forget old passes at a constant rate
            self.reached[i] *= self.decay
            self.kept[i] *= self.decay

    def _observe_costs(self, tokens: int, g: int, draft_s: float, target_s: float) -> None:
        """A pass that verified ``tokens`` tokens after g drafted positions (levels)."""
        step_s = time.perf_counter() - self._asked_at if self._asked_at is not None else None
        self._asked_at = None
        self.costs.record(tokens, target_s)
        self._verified[tokens] = self._step
        caught_up = not self._drafted_last  # this pass's first draft forward fed the tokens k = 1 passes skipped
        self._drafted_last = g > 0
        if g:
            per = draft_s / g
            s = self.smoothing
            if caught_up:  # it fed skipped tokens too, so it may only lower the estimate: a dear estimate
                # learned once (a slow spell) kept k at 1, and k = 1 passes followed by k = 2 ones never corrected it
                per = min(per, self.draft_s_per_position) if self.draft_s_per_position is not None else None
            if per is not None:
                self.draft_s_per_position = per if self.draft_s_per_position is None else (1 - s) * self.draft_s_per_position + s * per
        if step_s is not None:
            s = self.smoothing
            self.overhead_s = (1 - s) * self.overhead_s + s * max(0.0, step_s - draft_s - target_s)

    # ---- estimates ------------------------------------------------------------------------------

    def _pooled_acceptance(self) -> float:
        """Acceptance over all positions, smoothed by the prior."""
        a0, n0 = self.prior
        return (sum(self.kept) + a0 * n0) / (sum(self.reached) + n0) if sum(self.reached) + n0 > 0 else a0

    def position_acceptance(self) -> list[float]:
        """alpha_i for drafts 1 .. max_k - 1, each shrunk towards the pooled (prior-smoothed) rate."""
        pooled = self._pooled_acceptance()
        return [(kept + self.shrink * pooled) / (reached + self.shrink) if reached + self.shrink > 0 else pooled
                for kept, reached in zip(self.kept, self.reached)]

    def _verify_table(self) -> dict[int, float]:
        return self.costs.table(self.max_k)

    def verify_level(self) -> float:
        """Median of live over calibrated seconds in the recent passes (1 before any)."""
        return self.costs.level()

    def state(self) -> dict:
        """What the policy now believes: verify seconds per k (the fitted table, the calibration, the
        live level and the shape factors), draft seconds per drafted position, per-step overhead, acceptance by
        position and by confidence bin."""
        return {"verify_s": self._verify_table() if self.costs else {},
                "verify_level": self.verify_level(), "verify_calibrated": dict(self.costs.calibrated),
                "verify_shape": {k: self.costs.shape(k) for k in self.costs.calibrated},
                "draft_s_per_position": self.draft_s_per_position, "overhead_s": self.overhead_s,
                "position_acceptance": self.position_acceptance(),
                "confidence_acceptance": self.confidence_acceptance().tolist(),
                "confidence_drafts": self.conf_reached.tolist(), "gated": self.gate and self._gated}

    def __repr__(self) -> str:
        return f"AdaptiveK(max_k={self.max_k})"


def validate_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int (tokens scored per verify pass), got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (k = 1 is plain target decoding), got {k}")


def check_k_fits(max_k: int, n_positions: int, cache: str = "") -> None:
    """The limit on k: a verify pass writes k slots of the KV cache, so k < n_positions.
    ``cache`` may say where n_positions came from (appended to the message)."""
    if max_k >= n_positions:
        raise ValueError(f"k={max_k} too large: a verify pass of k tokens needs k < n_positions={n_positions}{cache}")


def parse_auto(k: str) -> AdaptiveK:
    """``"auto"`` -> AdaptiveK(max_k=8); ``"auto:12"`` -> AdaptiveK(max_k=12)."""
    head, _, tail = k.partition(":")
    if head != "auto":
        raise TypeError(f"k must be an int, 'auto' or 'auto:MAX', got {k!r}")
    if not tail:
        return AdaptiveK()
    try:
        max_k = int(tail)
    except ValueError:
        raise ValueError(f"k={k!r}: MAX in 'auto:MAX' must be an int") from None
    if max_k < 1:
        raise ValueError(f"k={k!r}: MAX in 'auto:MAX' must be >= 1")
    return AdaptiveK(max_k=max_k)


def as_policy(k):
    """An int becomes :class:`FixedK`, ``"auto[:MAX]"`` :class:`AdaptiveK`; a k-policy object
    (``max_k`` and ``next_k()``; see ``protocols.KPolicy``) is returned as is, after a check."""
    if isinstance(k, str):
        return parse_auto(k)
    if isinstance(k, KPolicyBase) or any(hasattr(k, m) for m in ("next_k", "max_k", "observe")):
        missing = [m for m in ("max_k", "next_k") if not hasattr(k, m)]
        if missing:
            raise TypeError(f"k-policy {type(k).__name__} lacks {', '.join(map(repr, missing))} "
                            "(see verispec.spec.protocols.KPolicy)")
        validate_k(k.max_k)
        return k
    return FixedK(k)


def default_k(speculation_lengths):
    """k for a generator given none: what ``target.enable_speculative_decoder(k)`` set. One length
    is a fixed k; several (transformers-neuronx compiles one graph per listed length, verispec runs
    any k) let :class:`AdaptiveK` choose k each step, up to the largest."""
    if not speculation_lengths:
        raise ValueError("no k: pass k to SpeculativeGenerator(draft, target, k) or call "
                         "target.enable_speculative_decoder(k) first")
    if len(speculation_lengths) == 1:
        return speculation_lengths[0]
    return AdaptiveK(max_k=max(speculation_lengths))
