"""The verify-cost table of :class:`~verispec.spec.policy.AdaptiveK`: seconds of a target pass
over k tokens, for every k the policy may choose."""

from __future__ import annotations

import statistics
from collections import deque


class VerifyCosts:
    """Calibration (the shape of the curve) x the live level, each k's own recent passes on top.

    ``calibrate`` times a target forward of every k in ``rounds`` rounds (up, down, up: a slow
    start or a drift does not favour one end) and keeps the fastest of each k. Every live pass
    goes into its k's window (the last ``window`` passes) and into the level: live seconds over
    calibrated seconds, median of the last ``4 * window`` passes of any k. The cost of k is the
    median of its window, pulled by ``prior`` pseudo-passes towards calibration x level; the
    table is made non-decreasing in k (pool-adjacent-violators, weighted by passes), so timing
    noise cannot make a longer pass look cheaper. The level absorbs what separates the calibration
    moment from the loop (the machine's speed then, the context length, caches the draft has just
    used); it ended at 0.77-1.29 in the cells of two measured runs (README).
    """

    def __init__(self, window: int = 16, prior: float = 2.0, rounds: int = 3):
        if window < 1 or not prior > 0 or rounds < 1:
            raise ValueError("verify_window and calibration_rounds must be >= 1 and verify_prior > 0, got "
                             f"{window}, {rounds}, {prior}")
        self.window, self.prior, self.rounds = window, prior, rounds
        self.calibrated: dict[int, float] = {}  # k -> seconds of a k-token forward at calibration
        self.samples: dict[int, deque] = {}  # k -> its last `window` live pass seconds
        self.ratios: deque = deque(maxlen=4 * window)  # live seconds / calibrated seconds, recent passes

    def __bool__(self) -> bool:
        return bool(self.calibrated or self.samples)

    def calibrate(self, time_verify, ks: list[int]) -> None:
        """``time_verify(k) -> seconds``; forgets the live passes. With two rounds, one measured
        start priced k = 2 at 1.2x k = 1 and k = 2..7 alike, where later rounds gave a smooth
        1.0-1.3x up to k = 8."""
        self.samples.clear()
        self.ratios.clear()
        best = {k: time_verify(k) for k in ks}
        for r in range(1, self.rounds):
            for k in (reversed(ks) if r % 2 else ks):
                best[k] = min(best[k], time_verify(k))
        self.calibrated = best

    def record(self, k: int, seconds: float) -> None:
        """A live verify pass: into k's window (the last ``window``) and the level. Medians,
        so one stalled pass at a seldom-used k cannot lift it above its neighbours and make the
        monotone fit pool it with them (with an exponential average it did: one run priced k = 6,
        7 and 8 alike at 108.6 ms where they cost about 97, 105 and 116, and k=auto drafted to 8)."""
        self.samples.setdefault(k, deque(maxlen=self.window)).append(seconds)
        if self.calibrated.get(k, 0) > 0:
            self.ratios.append(seconds / self.calibrated[k])

    def level(self) -> float:
        """Median of live over calibrated seconds in the recent passes (1 before any)."""
        return statistics.median(self.ratios) if self.ratios else 1.0

    def estimates(self) -> dict[int, tuple[float, float]]:
        """k -> (seconds, weight): k's window median and ``prior`` pseudo-passes at
        calibration x level, weighted by their number."""
        level, m, out = self.level(), self.prior, {}
        for k in sorted(set(self.calibrated) | set(self.samples)):
            window = self.samples.get(k, ())
            n = len(window)
            if k in self.calibrated:
                live = statistics.median(window) if n else 0.0
                out[k] = ((n * live + m * self.calibrated[k] * level) / (n + m), n + m)
            else:
                out[k] = (statistics.median(window), n)
        return out

    def table(self, max_k: int) -> dict[int, float]:
        """verify seconds for every k in 1..max_k: the estimates made non-decreasing, gaps filled
        from the nearest estimated k below (or above)."""
        estimates = self.estimates()
        ks = sorted(estimates)
        blocks = []  # pool adjacent violators: [total weighted seconds, weight, ks]
        for k in ks:
            s, w = estimates[k]
            blocks.append([s * w, w, [k]])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                s, w, kk = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += w
                blocks[-1][2] += kk
        fitted = {k: s / w for s, w, kk in blocks for k in kk}
        out = {}
        for k in range(1, max_k + 1):
            below = [j for j in ks if j <= k]
            out[k] = fitted[below[-1]] if below else fitted[ks[0]]
        return out
