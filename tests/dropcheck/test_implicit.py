"""The implicit regularizer: ξ_approx (4.5)-(4.6), dropout's gradient noise,
two-draw noise, DROPOUT_k and the noise-injection fix (Section 3.1).

Independent references (helpers.py): ``B = ∂/∂η ∇_W L(W; h ⊙ (1+η))`` at
η = 0 by ``torch.autograd.functional.jacobian`` of the parameter gradient of
a plain function of an explicit η; dropout's exact gradient mean/covariance
by enumerating every mask (tiny nets); Gaussian-noise covariance by
Gauss-Hermite quadrature.  Covariances are compared through scalar
projections ``⟨g, r⟩`` (fixed random unit ``r``) and traces, whose sample
means have a known standard error.  z-tests: |z| < 4.5, a 6.8e-6 two-sided
false-alarm rate per assertion for a Gaussian statistic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings

import dropcheck as dc




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
import dc_strategies as strategies

with_q = dc.with_drop_probability

# 8 noise units (256 masks): dropout's gradient moments exactly by enumeration
TINY = dict(sizes=[2, 2, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=2, seed=2)
SMALL = dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=1.5, n=4, seed=1)


# ---------------------------------------------------------------------------
# Cov(ξ_approx) exactly


@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS), max_hidden=1))
@example(SMALL)
@example(cases.TINY_Q)
def test_noise_covariance_matches_jacobian_of_parameter_gradient(case):
    """``implicit_noise_covariance`` = Σ_u Var(η_u) b_u b_uᵀ with b_u from the
    Jacobian of ∇_W L in an explicit η (linearised dropout gradient noise)."""
    model, X, y = cases.build(case)
    assert checks.check_noise_cov_exact(model, X, y) < 1e-10


def test_noise_jacobian_rows_and_variances():
    model, X, y = cases.build(SMALL)
    B, var = dc.implicit_noise_jacobian(model, X, y)
    Bref, vref = refs.bf_noise_jacobian(model, X, y)
    assert float((B - Bref.T).abs().max() / Bref.abs().max()) < 1e-10
    assert torch.allclose(var, vref, rtol=1e-15, atol=0)


def test_noise_covariance_params_subset():
    model, X, y = cases.build(SMALL)
    full = dc.implicit_noise_covariance(model, X, y)
    sub = dc.implicit_noise_covariance(model, X, y, params=["4.weight"])
    P0 = sum(p.numel() for n, p in model.named_parameters() if n in ("1.weight", "1.bias"))
    k = model[4].weight.numel()
    assert torch.allclose(sub, full[P0 : P0 + k, P0 : P0 + k], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------
# samples of ξ_approx


def test_implicit_noise_empirical_covariance_light():
    """300 samples of ``implicit_noise`` (scaled Rademacher η): E⟨ξ,r⟩² = rᵀCr,
    E‖ξ‖² = tr C and E⟨ξ,r⟩ = 0 (ξ is exactly mean zero)."""
    model, X, y = cases.build(SMALL)
    z = checks.check_noise_cov_empirical(model, X, y, n=300, seed=4)
    assert all(abs(v) < stats.Z_MAX for v in z.values()), z


@pytest.mark.heavy
@pytest.mark.parametrize("noise", ["rademacher", "bernoulli", "gaussian"])
def test_implicit_noise_empirical_covariance_heavy(noise):
    """3000 samples for each noise distribution (same covariance q/(1−q))."""
    model, X, y = cases.build(SMALL)
    z = checks.check_noise_cov_empirical(model, X, y, n=3000, seed=9, noise=noise)
    assert all(abs(v) < stats.Z_MAX for v in z.values()), z


def fd_vs_autograd(model, X, y, eps, seed=5):
    a = stats.flat(dc.implicit_noise(model, X, y, generator=seed), model)
    f = stats.flat(dc.implicit_noise(model, X, y, generator=seed, estimator="fd", eps=eps), model)
    return float((f - a).norm() / a.norm())


def test_implicit_noise_fd_equals_autograd_same_seed():
    """Same generator seed → same η; the central difference is ξ_approx + O(ε²):
    at the default ε (6e-6) they agree to 1e-7, and halving ε = 0.04 divides the
    difference by 4 ± 0.1."""
    model, X, y = cases.build(SMALL)
    assert fd_vs_autograd(model, X, y, None) < 1e-7
    e1, e2 = fd_vs_autograd(model, X, y, 0.04), fd_vs_autograd(model, X, y, 0.02)
    assert e1 > 1e-6  # bias resolved above rounding
    assert abs(e1 / e2 - 4) < 0.1, e1 / e2


# ---------------------------------------------------------------------------
# Cov(ξ_approx) vs dropout's own gradient noise


def rel_fro(A, B):
    return float((A - B).norm() / B.norm())


def _width_distance(widths, seeds, q=0.1):
    """Mean over seeds of ‖lim Cov(ξ_drop)/q − Cov(ξ_approx)/Var(η)‖_F / ‖·‖_F
    (both deterministic: deletion loop vs dc.implicit_noise_covariance)."""
    out = []
    for w in widths:
        ds = []
        for s in seeds:
            model = cases.width_net(w, seed=s, q=q)
            X, y = cases.data(4, 4, 3, seed=s)
            C = dc.implicit_noise_covariance(model, X, y) / (q / (1 - q))
            ds.append(rel_fro(refs.bf_deletion_grad_cov(model, X, y), C))
        out.append(sum(ds) / len(ds))
    return out


def test_noise_covariance_approaches_dropout_as_width_grows():
    """Bernoulli dropout, q → 0 limit (exact): the relative distance between
    dropout's gradient-noise covariance (Σ_u d_u d_uᵀ over single-unit
    deletions) and Cov(ξ_approx) falls with width (mean over 3 seeds; measured
    ≈ 0.33, 0.19, 0.07 at widths 4, 16, 64) and is < 0.12 at width 64."""
    d = _width_distance((4, 16, 64), (0, 1, 2))
    assert d[0] > d[1] > d[2], d
    assert d[0] > 0.2 and d[2] < 0.12, d


@pytest.mark.heavy
def test_noise_covariance_width_trend_heavy():
    d = _width_distance((4, 16, 64, 256), (0, 1, 2))
    assert all(a > b for a, b in zip(d, d[1:])), d
    assert d[-1] < 0.05, d


def test_noise_covariance_approaches_gaussian_dropout_as_q_to_0():
    """Gaussian noise: Cov(∇L(h(1+η))) = Cov(ξ_approx) + O(q²), so the relative
    Frobenius distance is O(q): each quarter of q at least halves it (measured
    ≈ 0.42, 0.145, 0.041 at q = 0.2, 0.05, 0.0125), < 0.06 at q = 0.0125."""
    d = []
    for q in (0.2, 0.05, 0.0125):
        model, X, y = cases.gaussian_net(q)
        d.append(rel_fro(refs.bf_gaussian_grad_cov(model, X, y, q), dc.implicit_noise_covariance(model, X, y)))
    assert all(b < 0.5 * a for a, b in zip(d, d[1:])), d
    assert d[-1] < 0.06, d


def _gaussian_gradient_z(q, n, seed):
    model, X, y = cases.gaussian_net(q)
    w = refs.Wired(model)
    nodes, wts = refs.gauss_hermite(3, 14)
    s = math.sqrt(q / (1 - q))
    G = torch.stack([w.flat_grad(w.loss(X, y, eta={0: s * z})).detach() for z in nodes])
    mean = (wts[:, None] * G).sum(0)
    cov = refs.bf_gaussian_grad_cov(model, X, y, q)
    r = stats.direction(mean.numel(), 3)
    g = cases.gen(seed)
    proj = [float(stats.flat(dc.dropout_gradient(model, X, y, generator=g), model) @ r) for _ in range(n)]
    return stats.zscore(proj, float(mean @ r)), stats.zscore([(p - float(mean @ r)) ** 2 for p in proj], float(r @ cov @ r))


def test_gaussian_dropout_gradient_samples_match_quadrature_light():
    """``dropout_gradient`` on a GaussianDropout site (q = 0.05), 400 draws:
    E⟨g, r⟩ = ⟨ḡ, r⟩ and E⟨g − ḡ, r⟩² = rᵀ Cov r, ḡ and Cov by quadrature."""
    zs = _gaussian_gradient_z(0.05, 400, 12)
    assert all(abs(z) < stats.Z_MAX for z in zs), zs


@pytest.mark.heavy
@pytest.mark.parametrize("q", [0.2, 0.05, 0.01])
def test_gaussian_dropout_gradient_samples_match_quadrature_heavy(q):
    zs = _gaussian_gradient_z(q, 5000, 13)
    assert all(abs(z) < stats.Z_MAX for z in zs), zs


# ---------------------------------------------------------------------------
# dropout's gradient noise: two draws, DROPOUT_k, noise injection


def test_dropout_gradient_mean_and_covariance_light():
    """k = 1: E⟨g − ḡ, r⟩² = rᵀ Cov(ξ_drop) r and E⟨g, r⟩ = ⟨ḡ, r⟩, exact by
    enumeration of the 256 masks; 300 draws."""
    model, X, y = cases.build(TINY)
    mean, cov = refs.bf_dropout_grad_moments(model, X, y)
    r = stats.direction(mean.numel(), 7)
    g = cases.gen(1)
    proj = [float(stats.flat(dc.dropout_gradient(model, X, y, generator=g), model) @ r) for _ in range(300)]
    assert abs(stats.zscore(proj, float(mean @ r))) < stats.Z_MAX
    sq = [(p - float(mean @ r)) ** 2 for p in proj]
    assert abs(stats.zscore(sq, float(r @ cov @ r))) < stats.Z_MAX


def test_two_draw_noise_covariance_is_twice_dropouts_light():
    """Cov(ξ̃_drop) = 2 Cov(ξ_drop): E⟨ξ̃, r⟩² = 2 rᵀCov r (ξ̃ has mean 0), 300 draws."""
    model, X, y = cases.build(TINY)
    z = checks.check_two_draw(model, X, y, n=300, seed=2)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.parametrize("k", [2, 4])
def test_dropout_k_covariance_falls_as_one_over_k_light(k):
    """E⟨g_k − ḡ, r⟩² = rᵀ Cov(ξ_drop) r / k, 200 draws of DROPOUT_k."""
    model, X, y = cases.build(TINY)
    z = checks.check_dropout_k(model, X, y, k, n=200, seed=k)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.parametrize("k", [2, 4])
def test_noise_injected_dropout_k_matches_dropout_1_light(k):
    """DROPOUT_k + sqrt((1 − 1/k)/2) ξ̃_drop: mean ḡ and covariance Cov(ξ_drop)
    (DROPOUT_1's), 200 draws."""
    model, X, y = cases.build(TINY)
    z = checks.check_dropout_k(model, X, y, k, n=200, seed=10 + k, injected=True)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.heavy
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_dropout_k_and_injection_heavy(k):
    """2000 draws each of DROPOUT_k and its noise-injected version, and the
    two-draw noise."""
    model, X, y = cases.build(TINY)
    assert abs(checks.check_dropout_k(model, X, y, k, n=2000, seed=100 + k)) < stats.Z_MAX
    if k > 1:
        assert abs(checks.check_dropout_k(model, X, y, k, n=2000, seed=200 + k, injected=True)) < stats.Z_MAX
    assert abs(checks.check_two_draw(model, X, y, n=2000, seed=300 + k)) < stats.Z_MAX


@pytest.mark.heavy
@settings(max_examples=4)
@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS), max_hidden=1))
def test_implicit_noise_empirical_covariance_drawn_nets_heavy(case):
    model, X, y = cases.build(case)
    z = checks.check_noise_cov_empirical(model, X, y, n=1500, seed=case["seed"] % 991)
    assert all(abs(v) < stats.Z_MAX for v in z.values()), z
