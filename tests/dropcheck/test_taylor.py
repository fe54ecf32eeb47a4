"""``dc.taylor_regularizer``: the second-order term (4.2) with the full Hessian.

Reference: ``Σ_ab (∂²L/∂h²)_ab C_ab`` with the dense Hessian of the mean loss
in the site input (``torch.autograd.functional.hessian`` of a plain function
of ``h``, helpers.py) and the site's noise second moment ``C``.
"""

from __future__ import annotations


import pytest
from hypothesis import example, given

import dropcheck as dc




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
import dc_strategies as strategies
TOL = 1e-9


@given(strategies.mlp_cases())
@example(cases.SATURATED)
@example(cases.TINY_Q)
@example(cases.LAST_ONLY)
def test_taylor_matches_dense_hessian(case):
    model, X, y = cases.build(case)
    assert checks.check_taylor(model, X, y, weighted=True) < TOL
    assert checks.check_taylor(model, X, y, weighted=False) < TOL


@given(strategies.mlp_cases(last_only=True))
@example(cases.LAST_ONLY)
@example(cases.SATURATED | dict(sites={1: 0.3}))
def test_taylor_equals_weighted_explicit_when_only_softmax_follows(case):
    """Site on the input of the last linear layer: D²_h(ℓ∘F) = JᵀH_out J exactly."""
    model, X, y = cases.build(case)
    assert checks.check_taylor_equals_explicit(model, X, y) < TOL


@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS), min_hidden=1))
@example(cases.TINY_Q)
def test_taylor_minus_explicit_is_the_model_hessian_term(case):
    """Wherever a site is followed by a nonlinearity, ``taylor − explicit`` is the
    model-Hessian term ``Σ_c ∂ℓ/∂z_c ⟨D²_h F_c, C⟩``, the same as on the dense route."""
    model, X, y = cases.build(case)
    err, _ = checks.check_model_hessian_term(model, X, y)
    assert err < TOL


@pytest.mark.parametrize(
    "case",
    [
        # tanh layer with non-trivial weights, site on its input
        dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3}, scale=2.0, n=4, seed=0),
        dict(sizes=[3, 5, 3], acts=["tanh"], sites={0: 0.3}, scale=2.5, n=4, seed=1),
        # softplus and sigmoid before the last layer
        dict(sizes=[2, 4, 4, 3], acts=["softplus", "sigmoid"], sites={0: 0.2, 1: 0.2}, scale=2.0, n=3, seed=2),
    ],
)
def test_taylor_differs_from_explicit_where_a_nonlinearity_follows(case):
    """On these drawn-once cases the model-Hessian term is far above rounding:
    R_taylor and the weighted R_approx must differ by > 1% (they agree to
    1e-15 where only the softmax follows)."""
    model, X, y = cases.build(case)
    err, size = checks.check_model_hessian_term(model, X, y)
    assert err < TOL
    assert size > 1e-2, size
    t = float(dc.taylor_regularizer(model, X, y).detach())
    e = float(dc.explicit_regularizer(model, X, y).detach())
    assert stats.rel(t, e) > 1e-2


def test_taylor_hutchinson_unbiased_light():
    """``taylor_regularizer(estimator="hutchinson")``: 100 calls × 8 probes,
    z-test against the dense value (|z| < 4.5: 6.8e-6 for a Gaussian statistic)."""
    model, X, y = cases.build(dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=2.0, n=3, seed=3))
    ref = sum(refs.bf_taylor(model, X, y).values())
    g = cases.gen(7)
    vals = [
        float(dc.taylor_regularizer(model, X, y, estimator="hutchinson", samples=8, generator=g).detach())
        for _ in range(100)
    ]
    z = stats.zscore(vals, ref)
    assert abs(z) < stats.Z_MAX, z


def test_taylor_cross_site_terms_absent():
    """The total is the sum of per-site values (independent masks: no cross terms)."""
    model, X, y = cases.build(dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=2.0, n=3, seed=3))
    per = dc.taylor_regularizer(model, X, y, per_site=True)
    tot = float(dc.taylor_regularizer(model, X, y).detach())
    assert stats.rel(sum(float(v.detach()) for v in per.values()), tot) < 1e-13
