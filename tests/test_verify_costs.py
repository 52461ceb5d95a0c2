"""VerifyCosts (spec/verify_costs.py): its vectorised fit equals the fit its docstring states,
written plainly with statistics.median, bit for bit after every pass."""

from __future__ import annotations


def _solve_reference(costs, start):
    """VerifyCosts' fit as its docstring states it, written plainly (statistics.median, one
    pass at a time): the vectorised solve must give exactly these numbers."""
    import statistics

    ks, xs = [k for k, _ in costs.passes], [x for _, x in costs.passes]
    shape, counts, n = dict(start), {}, len(ks)
    shrunk = lambda r: len(r) * statistics.median(r) / (len(r) + costs.prior)  # noqa: E731
    for _ in range(2):
        level = [x - shape.get(k, 0.0) for k, x in zip(ks, xs)]
        residuals = {}
        for i in range(n):
            around = [level[j] for j in range(max(0, i - costs.reach), min(n, i + costs.reach + 1)) if ks[j] != ks[i]]
            if around:
                residuals.setdefault(ks[i], []).append(xs[i] - statistics.median(around))
        shape = {k: shrunk(r) for k, r in residuals.items()}
        counts = {k: len(r) for k, r in residuals.items()}
        if shape:
            mid = statistics.median(shape.values())
            shape = {k: v - mid for k, v in shape.items()}
    recent = [x - shape.get(k, 0.0) for k, x in zip(ks[-costs.level_window:], xs[-costs.level_window:])]
    return shape, counts, statistics.median(recent) if recent else 0.0


def test_verify_costs_solve_equals_the_plain_medians():
    """Random passes (k's in runs and mixed, a k without calibration, windows shorter than the
    reach): after every pass the fit is bit for bit the plain one."""
    import random

    from verispec.spec.verify_costs import VerifyCosts

    rng = random.Random(0)
    for window, reach, level_window in ((128, 4, 16), (8, 1, 4), (32, 2, 16), (5, 4, 3)):
        costs = VerifyCosts(window=window, reach=reach, level_window=level_window)
        costs.calibrate(lambda k: 0.05 * (1 + 0.1 * k), [1, 2, 3, 4, 5, 6])
        assert costs._solve() == ({}, {}, 0.0)  # no pass yet
        k = 1
        for _ in range(150):
            k = k if rng.random() < 0.6 else rng.choice([1, 2, 3, 4, 5, 6, 9])  # 9: no calibration, not a pass
            start = dict(costs._shape)  # each solve starts from the last one's shapes
            costs.record(k, 0.05 * (1 + 0.1 * k) * rng.lognormvariate(0.0, 0.3))
            if k != 9:
                assert costs._solve() == _solve_reference(costs, start)
