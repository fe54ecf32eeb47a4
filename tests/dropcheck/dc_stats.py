"""Statistics and error measures of the tests.

Every statistical check returns a z-score of a sample mean with its own
estimated standard error (``dropcheck.testing.zscore``); the tests accept
``|z| < Z_MAX = 4.5``, a two-sided false-alarm rate of 6.8e-6 per test for a
Gaussian statistic (the means here are over >= 100 draws; skew of the
per-draw values can raise this by a small factor, still < 1e-4).
"""

from __future__ import annotations

import torch

from dc_cases import DT, gen

# the z-score and its threshold are the public kit's (dropcheck.testing), the
# same ones a user's suite gets
from dropcheck.testing import Z_MAX, zscore  # noqa: E402,F401


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def max_rel(d1: dict, d2: dict) -> float:
    assert set(d1) == set(d2), (sorted(d1), sorted(d2))
    return max(abs(float(d1[k]) - d2[k]) / max(abs(d2[k]), 1e-300) for k in d2)


def flat(grads: dict, model) -> torch.Tensor:
    """A gradient dict flattened in the model's parameter order."""
    return torch.cat([grads[n].reshape(-1) for n, p in model.named_parameters() if n in grads])


def direction(P: int, seed: int) -> torch.Tensor:
    r = torch.randn(P, generator=gen(seed), dtype=DT)
    return r / r.norm()


U64 = float(torch.finfo(DT).eps)  # 2.2e-16


# The exact estimator evaluates uᵀH_out u as Σ p u² − (Σ p u)²; its float64 forward
# error is a few ulps of the cancelling magnitude ``scale`` = Σ_c p_c u_c².  Errors are
# measured relative to max(|ref|, FLOOR·scale): a relative error <= 1e-9 where the
# value is resolvable, and <= 1e-9·FLOOR = 1.4e-14 of the scale where it is not
# (saturated softmax; test_explicit.py::test_saturated_softmax_relative_accuracy
# records that dropcheck does not reach relative accuracy there).
FLOOR = 64 * U64 / 1e-9  # 1.4e-5


def scaled_err(got: dict, ref: dict, scales: dict) -> float:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    return max(abs(float(got[k]) - ref[k]) / max(abs(ref[k]), FLOOR * scales[k], 1e-300) for k in ref)
