"""The verify-cost table of :class:`~verispec.spec.policy.AdaptiveK`: seconds of a target pass
over k tokens, for every k the policy may choose."""

from __future__ import annotations

import math
import statistics
from collections import deque

import numpy as np


def _median(values: list[float]) -> float:
    """``statistics.median`` of a non-empty list, with its arithmetic (the middle value, or the
    mean of the two middle ones as (a + b) / 2), without its overhead."""
    v = sorted(values)
    h = len(v) // 2
    return v[h] if len(v) % 2 else (v[h - 1] + v[h]) / 2


class VerifyCosts:
    """Verify seconds of k = calibration(k) x the machine's level now x a learnt shape factor(k).

    A pass is modelled as ``seconds = calibrated[k] * level(t) * shape[k] * noise``: the
    calibration is the curve's shape measured in one burst, the level is the machine's speed at
    the time of the pass (a shared VM drifts by tens of percent within seconds), and shape[k]
    corrects the calibration's shape where the loop disagrees with it.

    - ``calibrate`` times a target forward of every k in ``rounds`` rounds (up, down, up: a slow
      start or a drift does not favour one end) and keeps the fastest of each k.
    - Each live pass gives a ratio, live seconds / calibrated seconds. A pass of k is compared
      with the passes of *other* k's within ``reach`` passes either side of it (their ratios
      divided by their own shape factors, median): the quotient is one residual of k, free of
      the machine's speed at that moment. shape[k] is the median of k's residuals among the last
      ``window`` passes, shrunk in log space by ``prior`` pseudo-residuals towards 1 (the
      calibration). Passes fix the shapes relative to each other only (a common factor is the
      level's), so they are centred: the median shape of the k's that ran is 1. Shape factors and
      residuals are solved together (two alternating rounds a pass, each solve starting from the
      last one's shapes, so the fit converges over passes), and a residual is revised when passes
      after it arrive.
    - The level is the median of ratio / shape over the last ``level_window`` passes of any k.

    Why compare with neighbours rather than keep each k's raw seconds: k=auto runs a given k in
    clusters (a prompt where the draft is often unsure ends passes at k = 6), so a k's raw passes
    record the machine's speed during its cluster. Measured: one prompt of a run decoded during a
    slow spell (target-only 107 ms a token against 80-88 on the other prompts), k=auto ran 12 of
    its 33 k = 6 passes there, and its table priced k = 6 with k = 7 and 8 (115.6 ms) for the rest
    of the run, where the fixed-k paths paid 97, 108 and 117 ms; k=auto then drafted to 8
    (bench/results/e2e_step_p8_nohf.json, README). A pass with no other k around it says nothing
    about the shape (its cluster's level and its k's shape cannot be told apart) and leaves the
    calibration's shape in place. With ``level_window=0`` nothing is compared: shape[k] is k's
    recent median against its calibration and the level is 1, the estimator that ran before the
    level (kept for comparison).
    """

    def __init__(self, window: int = 128, prior: float = 2.0, rounds: int = 3, level_window: int = 16,
                 reach: int = 4):
        if window < 1 or not prior > 0 or rounds < 1 or level_window < 0 or reach < 1:
            raise ValueError("verify_window and calibration_rounds must be >= 1, verify_prior > 0 and "
                             f"verify_level_window >= 0, got {window}, {rounds}, {prior}, {level_window}")
        self.window, self.prior, self.rounds = window, prior, rounds
        self.level_window, self.reach = level_window, reach
        self.calibrated: dict[int, float] = {}  # k -> seconds of a k-token forward at calibration
        self.passes: deque = deque(maxlen=window)  # (k, log(live / calibrated)) of recent passes
        self.raw: dict[int, deque] = {}  # k -> its last `window` live seconds (k's without a calibration)
        self._fit: tuple[dict[int, float], dict[int, int], float] | None = None  # log shapes, residual counts, log level
        self._shape: dict[int, float] = {}  # log shapes of the last solve: the next one starts from them

    def __bool__(self) -> bool:
        return bool(self.calibrated or self.raw)

    def calibrate(self, time_verify, ks: list[int]) -> None:
        """``time_verify(k) -> seconds``; forgets the live passes. With two rounds, one measured
        start priced k = 2 at 1.2x k = 1 and k = 2..7 alike, where later rounds gave a smooth
        1.0-1.3x up to k = 8."""
        self.passes.clear()
        self.raw.clear()
        self._fit = None
        self._shape = {}
        best = {k: time_verify(k) for k in ks}
        for r in range(1, self.rounds):
            for k in (reversed(ks) if r % 2 else ks):
                best[k] = min(best[k], time_verify(k))
        self.calibrated = best

    def record(self, k: int, seconds: float) -> None:
        """A live verify pass of k tokens. Medians throughout, so one stalled pass moves nothing
        (with an exponential average one stall at a seldom-used k lifted it above k + 1 and the
        monotone fit pooled them)."""
        self.raw.setdefault(k, deque(maxlen=self.window)).append(seconds)
        c = self.calibrated.get(k, 0.0)
        if c > 0 and seconds > 0:
            self.passes.append((k, math.log(seconds / c)))
            self._fit = None
            self._solve()  # once per pass, so the fit depends on the passes only, not on how often it is read

    def _solve(self) -> tuple[dict[int, float], dict[int, int], float]:
        """-> (log shape per k, residuals behind it, log level), from the recent passes."""
        if self._fit is not None:
            return self._fit
        ks = [k for k, _ in self.passes]
        xs = [x for _, x in self.passes]
        n, shape, counts = len(xs), dict(self._shape), {}
        if not self.level_window:  # no level: each k against its calibration alone
            for k in set(ks):
                r = [x for kk, x in zip(ks, xs) if kk == k]
                shape[k], counts[k] = self._shrunk(r), len(r)
            self._fit = (shape, counts, 0.0)
            return self._fit
        # Each pass's neighbours: the passes of other k's within `reach` either side, the same in
        # both rounds; their medians are taken for all passes at once (numpy, the same arithmetic
        # as statistics.median: the middle value, or (a + b) / 2): the solve runs once per pass
        # over up to `window` passes, and in Python it dominated the simulator's run time.
        ks_a, xs_a = np.array(ks, dtype=np.int64), np.array(xs, dtype=np.float64)  # [n]
        offsets = np.array([o for o in range(-self.reach, self.reach + 1) if o])  # [2 reach]
        idx = np.arange(n)[:, None] + offsets[None, :]  # [n, 2 reach]
        idx_c = idx.clip(0, max(n - 1, 0))
        valid = (idx >= 0) & (idx < n) & (ks_a[idx_c] != ks_a[:, None])  # [n, 2 reach]
        count = valid.sum(1)  # [n]
        has = count > 0  # passes with another k around them
        count, valid, idx_c = count[has], valid[has], idx_c[has]
        rows, half, odd = np.arange(len(count)), count // 2, count % 2 == 1
        ks_has, xs_has = ks_a[has], xs_a[has]
        order = list(dict.fromkeys(ks_has.tolist()))  # k's in order of their first residual
        uniq, which = np.unique(ks_a, return_inverse=True)  # the k's that ran; each pass's index among them
        for _ in range(2):  # residuals use the neighbours' shapes, shapes the residuals (warm start: it converges over passes)
            level = xs_a - np.array([shape.get(k, 0.0) for k in uniq.tolist()], dtype=np.float64)[which]  # [n] the machine's log speed per pass
            around = np.where(valid, level[idx_c], np.inf)  # [m, 2 reach], missing ones sort last
            around.sort(axis=1)
            lo = around[rows, np.maximum(half - 1, 0)]
            hi = around[rows, half]
            med = np.where(odd, hi, (lo + hi) / 2)
            res = xs_has - med  # [m] one residual per pass, in pass order
            residuals = {k: res[ks_has == k].tolist() for k in order}
            shape = {k: self._shrunk(r) for k, r in residuals.items()}
            counts = {k: len(r) for k, r in residuals.items()}
            if shape:  # the data fix shapes relative to each other only: the median k's stays at its calibration
                mid = _median(list(shape.values()))
                shape = {k: v - mid for k, v in shape.items()}
        recent = [x - shape.get(k, 0.0) for k, x in zip(ks[-self.level_window:], xs[-self.level_window:])]
        self._shape = shape
        self._fit = (shape, counts, statistics.median(recent) if recent else 0.0)
        return self._fit

    def _shrunk(self, logs: list[float]) -> float:
        """Median of ``logs`` shrunk towards 0 by ``prior`` pseudo-values."""
        return len(logs) * _median(logs) / (len(logs) + self.prior) if logs else 0.0

    def level(self) -> float:
        """The machine's speed now, relative to the calibration (1 before any pass, or untracked)."""
        return math.exp(self._solve()[2])

    def shape(self, k: int) -> float:
        """The factor the loop's passes put on calibrated[k] (1: the calibration's shape holds)."""
        return math.exp(self._solve()[0].get(k, 0.0))

    def estimates(self) -> dict[int, tuple[float, float]]:
        """k -> (seconds, weight): calibration x level x shape, weighted by k's residuals + the prior."""
        shape, counts, level = self._solve()
        out = {}
        for k in sorted(set(self.calibrated) | set(self.raw)):
            if k in self.calibrated:
                out[k] = (self.calibrated[k] * math.exp(level + shape.get(k, 0.0)), counts.get(k, 0) + self.prior)
            else:
                out[k] = (statistics.median(self.raw[k]), len(self.raw[k]))
        return out

    def table(self, max_k: int) -> dict[int, float]:
        """verify seconds for every k in 1..max_k: the estimates made non-decreasing
        (pool-adjacent-violators, weighted), gaps filled from the nearest estimated k below (or above)."""
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
