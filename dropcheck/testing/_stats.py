"""z-scores of sample means, the statistic every check of the kit reports."""

from __future__ import annotations

import math

import torch

# Two-sided Gaussian tail P(|Z| > 4.5) = 6.8e-6: one false alarm in ~150 000
# checks for a mean over >= 100 i.i.d. draws (skewed draws can raise this by a
# small factor, still < 1e-4).
Z_MAX = 4.5


def mean_stderr(values) -> tuple[float, float]:
    """``(mean, standard error of the mean)`` of i.i.d. draws (float64)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() < 2:
        raise ValueError(f"a standard error needs at least 2 draws, got {v.numel()}")
    return float(v.mean()), float(v.std(unbiased=True)) / math.sqrt(v.numel())


def zscore(values, target: float) -> float:
    """``(mean − target)/stderr`` of i.i.d. draws (``inf`` for a zero
    standard error and a miss).  Where the draws barely vary the spread is
    rounding: the standard error is floored at ``1e-12`` of the compared
    magnitude, so a 1e-16 difference between two float64 routes is not a
    statistical miss."""
    mean, se = mean_stderr(values)
    d = mean - float(target)
    se = max(se, 1e-12 * max(abs(float(target)), abs(mean)))
    if se == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / se


def two_sample_z(a: float, se_a: float, b: float, se_b: float) -> float:
    """``(a − b)/sqrt(se_a² + se_b²)`` for two independent estimates."""
    se = math.hypot(se_a, se_b)
    d = float(a) - float(b)
    if se == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / se
