"""``dc.explicit_regularizer``: R_approx (4.3)-(4.4) and its estimators.

References are float64 brute force written in ``helpers.py``: dense
Jacobians ``∂Z/∂h`` of the network as a plain function of the site input
(``torch.autograd.functional.jacobian``), ``H_out`` in a cancellation-free
centred form, and the site's noise second moment ``C``; plus the closed form
of softmax regression.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dropcheck as dc




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
import dc_strategies as strategies

TOL = 1e-9  # relative (dc_stats.FLOOR): float64 brute force vs float64 estimator


mlp_cases = strategies.mlp_cases
build = cases.build
SATURATED, TINY_Q, LAST_ONLY = cases.SATURATED, cases.TINY_Q, cases.LAST_ONLY


# ---------------------------------------------------------------------------
# exact estimator vs brute force


@given(mlp_cases())
@example(SATURATED)
@example(TINY_Q)
@example(LAST_ONLY)
def test_exact_matches_dense_jacobian_route(case):
    model, X, y = build(case)
    assert checks.check_explicit_exact(model, X, y, weighted=True) < TOL
    assert checks.check_explicit_exact(model, X, y, weighted=False) < TOL


@given(mlp_cases(max_hidden=1))
@example(SATURATED)
def test_identity_hessian_ablation_matches_dense_route(case):
    """Section 5.2 ablation: H_out replaced by I/c (Σ_i ‖J diag(h)‖²_F / c)."""
    model, X, y = build(case)
    assert checks.check_explicit_exact(model, X, y, hessian="identity") < TOL


@given(
    d=st.integers(1, 5),
    c=st.integers(2, 5),
    n=st.integers(1, 6),
    q=st.floats(1e-3, 0.95),
    logit_scale=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
@example(d=4, c=3, n=5, q=0.3, logit_scale=30.0, seed=0)  # saturated softmax (logit gaps ~ 40)
@example(d=3, c=2, n=2, q=1e-3, logit_scale=1.0, seed=1)  # q near 0
def test_softmax_regression_closed_form(d, c, n, q, logit_scale, seed):
    """``nn.Sequential(nn.Dropout(q), nn.Linear(d, c))``: the weighted
    regularizer is ``λ mean_n Σ_k x_nk² (Wᵀ H_out,n W)_kk`` with ``p`` from the
    clean (dropout-free) logits."""
    assert checks.check_softmax_regression(d, c, n, q, seed, logit_scale) < TOL


def test_saturated_softmax_relative_accuracy():
    """The regularizer of a saturated softmax is tiny but well defined; an
    accurate float64 evaluation has relative error ~1e-15 (the closed form in
    the centred form Σ_c p_c (W_ck − Σ p W_·k)² achieves it)."""
    assert checks.check_softmax_regression(4, 3, 5, 0.3, 0, logit_scale=30.0, relative_only=True) < TOL


def test_softmax_regression_uses_clean_probabilities():
    """p is the dropout-free softmax even if the model is in training mode and
    the regularizer is evaluated twice (no randomness leaks into it)."""
    model = cases.mlp([4, 3], [], {0: 0.5}, seed=3)
    X, y = cases.data(6, 4, 3, seed=3)
    model.train()
    a = float(dc.explicit_regularizer(model, X, y).detach())
    b = float(dc.explicit_regularizer(model, X, y).detach())
    W, bias = model[1].weight.detach(), model[1].bias.detach()
    assert a == b
    assert stats.rel(a, refs.softmax_regression_closed_form(W, bias, X, 0.5)) < TOL


def test_weighted_is_lambda_times_unweighted():
    model, X, y = build(dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.2, 1: 0.6}, scale=1.5, n=3, seed=4))
    w = dc.explicit_regularizer(model, X, y, per_site=True)
    u = dc.explicit_regularizer(model, X, y, weighted=False, per_site=True)
    for key, q in (("0", 0.2), ("3", 0.6)):
        assert stats.rel(float(w[key].detach()), q / (2 * (1 - q)) * float(u[key].detach())) < 1e-14


def test_loss_jacobian_ablation_matches_brute_force():
    """(5.1): Σ_k h_k² (∂ℓ/∂h_k)² with the true label, per example, averaged."""
    model, X, y = build(dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=1.5, n=3, seed=6))
    w = refs.Wired(model)
    got = dc.loss_jacobian_regularizer(model, X, y, per_site=True)
    for j, call in enumerate(w.calls(X)):
        ref = 0.0
        for n in range(X.shape[0]):
            hh = call.h.clone().requires_grad_(True)
            ln = torch.nn.functional.cross_entropy(w.logits(X, replace={j: hh})[n : n + 1], y[n : n + 1])
            (g,) = torch.autograd.grad(ln, hh)
            ref += float(((g * call.h) ** 2).sum())
        ref = call.site.lam * ref / X.shape[0]
        assert stats.rel(float(got[call.key].detach()), ref) < TOL


# ---------------------------------------------------------------------------
# unbiasedness of the stochastic estimators (z-tests; |z| < 4.5: 6.8e-6 per
# test for a Gaussian statistic, see helpers)

LIGHT_CASE = dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 2: 0.2}, scale=1.5, n=4, seed=1)


@pytest.mark.parametrize("estimator", ["sampled", "hutchinson", "fd"])
def test_estimator_unbiased_light(estimator):
    """100 independent calls of 8 probes each (800 draws), deterministic seed."""
    model, X, y = build(LIGHT_CASE)
    z = checks.check_estimator_unbiased(model, X, y, estimator, calls=100, samples=8, seed=11)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.heavy
@settings(max_examples=6)
@given(case=mlp_cases(acts=tuple(cases.SMOOTH_ACTS)), estimator=st.sampled_from(["sampled", "hutchinson", "fd"]))
def test_estimator_unbiased_heavy(case, estimator):
    """400 calls × 8 probes on drawn networks (false alarm as above, per example)."""
    model, X, y = build(case)
    z = checks.check_estimator_unbiased(model, X, y, estimator, calls=400, samples=8, seed=case["seed"] % 1000)
    assert abs(z) < stats.Z_MAX, z


def test_estimators_unbiased_unweighted_and_identity_light():
    """Unweighted values and the identity ablation are unbiased too (hutchinson and fd;
    the sampled estimator draws r with E[rrᵀ] = I/c for the ablation)."""
    model, X, y = build(LIGHT_CASE)
    ref_u = sum(refs.bf_explicit(model, X, y, weighted=False).values())
    z = checks.check_estimator_unbiased(model, X, y, "hutchinson", calls=30, samples=8, seed=3, weighted=False, target=ref_u)
    assert abs(z) < stats.Z_MAX, z
    ref_i = sum(refs.bf_explicit(model, X, y, hessian="identity").values())
    g = cases.gen(5)
    for est in ("sampled", "hutchinson", "fd"):
        vals = [
            float(dc.explicit_regularizer(model, X, y, estimator=est, samples=8, generator=g, hessian="identity").detach())
            for _ in range(30)
        ]
        z = stats.zscore(vals, ref_i)
        assert abs(z) < stats.Z_MAX, (est, z)


# ---------------------------------------------------------------------------
# finite-difference bias O(ε²)


@pytest.mark.parametrize("eps", [0.08, 0.04])
def test_fd_bias_shrinks_as_eps_squared(eps):
    """fd and hutchinson with the same generator seed use the same Rademacher
    probe, so their difference is pure fd bias ``a ε² + O(ε⁴)``: halving ε
    divides it by 4 (to O(ε²))."""
    model, X, y = build(LIGHT_CASE)
    ratio, size = checks.fd_bias_ratio(model, X, y, eps)
    assert size > 1e-6  # the bias is resolved far above rounding (~1e-12 here)
    assert abs(ratio - 4.0) < 0.05, ratio


def test_fd_default_eps_equals_hutchinson_same_probe():
    model, X, y = build(LIGHT_CASE)
    for seed in range(3):
        h = dc.explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed, per_site=True)
        f = dc.explicit_regularizer(model, X, y, estimator="fd", generator=seed, per_site=True)
        for k in h:
            assert stats.rel(float(f[k].detach()), float(h[k].detach())) < 1e-7


def test_single_probe_exact_for_one_unit_site():
    """With one noise unit (a site of width 1 and one example) every probe is
    ±h, so hutchinson equals the exact value for every seed."""
    model, X, y = build(dict(sizes=[1, 3], acts=[], sites={0: 0.4}, scale=1.0, n=1, seed=2))
    ex = float(dc.explicit_regularizer(model, X, y).detach())
    for seed in range(3):
        hv = float(dc.explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed).detach())
        assert stats.rel(hv, ex) < 1e-12
