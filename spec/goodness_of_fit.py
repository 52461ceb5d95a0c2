"""Goodness-of-fit of an empirical histogram against an exact distribution: Pearson chi-square
and the G statistic (likelihood ratio), with cells of small expected count pooled, plus the
total-variation distance. No scipy: the chi-square survival function is the regularised upper
incomplete gamma function, ``torch.special.gammaincc(dof / 2, x / 2)``.
"""

from __future__ import annotations

import math

import torch


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof)."""
    if dof < 1:
        raise ValueError(f"chi-square needs dof >= 1, got {dof}")
    if x <= 0:
        return 1.0
    a = torch.tensor(dof / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(x / 2.0, dtype=torch.float64)))


def pool_cells(expected: torch.Tensor, min_expected: float) -> torch.Tensor:
    """Bin id per cell [C] (int64): cells in ascending order of expected count are merged until
    each bin expects at least ``min_expected``; a short last bin joins the one before it."""
    order = torch.argsort(expected, stable=True).tolist()
    values = expected.tolist()
    bins = [0] * len(values)
    current, acc, open_cells = 0, 0.0, 0
    for i in order:
        bins[i] = current
        acc += values[i]
        open_cells += 1
        if acc >= min_expected:
            current, acc, open_cells = current + 1, 0.0, 0
    if open_cells and current > 0:  # leftover cells expect < min_expected: join the last full bin
        bins = [current - 1 if b == current else b for b in bins]
    return torch.tensor(bins, dtype=torch.long)


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> dict:
    """counts [C] observed, probs [C] exact (summing to 1). Returns statistics and p-values.

    Cells with probability 0 are not binned: observing one is an impossible outcome, reported
    as ``impossible`` and given p-value 0.
    """
    counts = counts.double()
    probs = probs.double()
    if counts.shape != probs.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and probs {tuple(probs.shape)} differ in shape")
    total = probs.sum()
    if not math.isclose(float(total), 1.0, abs_tol=1e-6):
        raise ValueError(f"exact probabilities sum to {float(total)}, not 1")
    N = float(counts.sum())
    if N <= 0:
        raise ValueError("no samples")
    possible = probs > 0
    impossible = int(counts[~possible].sum())
    tv = 0.5 * float((counts / N - probs).abs().sum())
    expected = probs[possible] * N
    bins = pool_cells(expected, min_expected)
    n_bins = int(bins.max()) + 1 if bins.numel() else 0
    obs = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, counts[possible])
    exp = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, expected)
    dof = n_bins - 1
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    nz = obs > 0
    g_stat = float(2.0 * (obs[nz] * torch.log(obs[nz] / exp[nz])).sum())
    if dof >= 1:
        p_chi2, p_g = chi2_sf(chi2, dof), chi2_sf(g_stat, dof)
    else:  # a single bin (one possible outcome): nothing to test beyond impossibility
        p_chi2 = p_g = 1.0
    if impossible:
        p_chi2 = p_g = 0.0
    return {
        "samples": int(N),
        "cells": int(probs.numel()),
        "bins": n_bins,
        "dof": dof,
        "chi2": chi2,
        "p_chi2": p_chi2,
        "g": g_stat,
        "p_g": p_g,
        "tv_distance": tv,
        "impossible": impossible,
    }
