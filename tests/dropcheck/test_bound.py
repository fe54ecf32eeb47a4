"""Tests of ``dropcheck.bound`` (Theorem 4.1 on linear models) and of the
``dropcheck bound`` command.

Every closed form is checked against an independent route: autograd
Jacobians/Hessians of the cross-entropy in the logits (μ, ν), autograd input
Hessians and exact enumeration of dropout masks (the explicit penalty),
double backward and central finite differences (the implicit noise).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dropcheck import bound
from dropcheck._errors import DataError, DropcheckError

F64 = torch.float64


# ---------------------------------------------------------------------------
# strategies and references
# ---------------------------------------------------------------------------


def _floats(lo=-3.0, hi=3.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def problems(draw, max_n=5, max_c=4, max_d=4, scale=3.0):
    """A linear softmax problem ``(W (c, d), X (n, d), y (n,))`` as numpy."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, max_c))
    d = draw(st.integers(1, max_d))
    W = draw(hnp.arrays(np.float64, (c, d), elements=_floats(-scale, scale)))
    X = draw(hnp.arrays(np.float64, (n, d), elements=_floats(-scale, scale)))
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return W, X, y


def _saturated():
    """Logits of order ±200: a float64 softmax that is exactly one-hot."""
    W = np.array([[40.0, 0.0], [0.0, 40.0], [-40.0, -40.0]])
    X = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    y = np.array([0, 1, 1])  # the last one confidently wrong
    return W, X, y


def _loss_of_logits(z, yi):
    return -torch.log_softmax(z, 0)[yi]


def _autograd_mu_nu(W, X, y):
    """μ and ν from autograd Jacobians/Hessians of ℓ_y in the logits, per example."""
    Z = torch.as_tensor(X, dtype=F64) @ torch.as_tensor(W, dtype=F64).T
    norms, traces = [], []
    for z, yi in zip(Z, torch.as_tensor(y)):
        f = lambda zz: _loss_of_logits(zz, int(yi))  # noqa: E731
        Jz = torch.autograd.functional.jacobian(f, z)
        Hz = torch.autograd.functional.hessian(f, z)
        norms.append(float(torch.linalg.vector_norm(Jz)))
        traces.append(float(torch.trace(Hz)))
    return float(np.mean(norms)), float(np.mean(traces))


def _input_hessians(W, X, y):
    """Per-example Hessian of ℓ_y(W x) in the input x, shape (n, d, d), by autograd."""
    Wt = torch.as_tensor(W, dtype=F64)
    out = []
    for x, yi in zip(torch.as_tensor(X, dtype=F64), torch.as_tensor(y)):
        out.append(torch.autograd.functional.hessian(lambda xx: _loss_of_logits(Wt @ xx, int(yi)), x))
    return torch.stack(out)


# ---------------------------------------------------------------------------
# μ and ν
# ---------------------------------------------------------------------------


@given(problems())
@example(_saturated())
@example((np.zeros((3, 2)), np.ones((2, 2)), np.array([0, 2])))
def test_mu_nu_match_autograd_jacobian_and_hessian_in_the_logits(prob):
    W, X, y = prob
    mu_ref, nu_ref = _autograd_mu_nu(W, X, y)
    assert bound.mu(W, X, y) == pytest.approx(mu_ref, rel=1e-9, abs=1e-12)
    assert bound.nu(W, X, y) == pytest.approx(nu_ref, rel=1e-9, abs=1e-12)


@given(problems(), st.randoms(use_true_random=False))
@example(_saturated(), __import__("random").Random(0))
def test_nu_does_not_depend_on_labels(prob, rnd):
    W, X, y = prob
    c = W.shape[0]
    y2 = np.array([rnd.randrange(c) for _ in y], dtype=np.int64)
    assert bound.nu(W, X, y2) == bound.nu(W, X, y)


def test_mu_nu_at_zero_weights_are_the_uniform_values():
    c, n = 5, 7
    X = np.random.default_rng(0).normal(size=(n, 3))
    y = np.arange(n) % c
    W = np.zeros((c, 3))
    assert bound.mu(W, X, y) == pytest.approx(math.sqrt((c - 1) / c), rel=1e-13)
    assert bound.nu(W, X, y) == pytest.approx(1 - 1 / c, rel=1e-13)


@given(st.integers(0, 10_000))
def test_mu_nu_vanish_as_a_separable_model_becomes_certain_and_correct(seed):
    rng = np.random.default_rng(seed)
    c, d, n = 4, 3, 12
    W0 = rng.normal(size=(c, d))
    X = rng.normal(size=(n, d))
    Z = X @ W0.T
    y = Z.argmax(1)
    top2 = np.sort(Z, 1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    if margin < 1e-6:
        return  # (measure-zero) ties
    mus = [bound.mu(t * W0, X, y) for t in (0.0, 1.0, 60.0 / margin)]
    nus = [bound.nu(t * W0, X, y) for t in (0.0, 1.0, 60.0 / margin)]
    assert mus[2] < 1e-20 and nus[2] < 1e-20
    assert mus[2] < mus[1] < mus[0] and nus[2] < nus[1] < nus[0]
    # stable near saturation: no cancellation to exactly 0, still positive
    assert mus[2] > 0 and nus[2] > 0


def _mpmath_mu_nu(W, X, y):
    """μ and ν in high-precision arithmetic (mpmath): the reference near
    saturation.  The precision grows with the logit spread, so that
    ``1 - ‖p‖²`` and ``1 - p_y`` (as small as ``e^{-spread}``) keep 40
    significant digits despite the cancellation in the textbook formulas."""
    import mpmath

    spread = float(np.abs(X @ W.T).max(initial=0.0)) * 2
    with mpmath.workdps(40 + int(spread / math.log(10)) + 10):
        mus, nus = [], []
        for x, yi in zip(X, y):
            z = [mpmath.fsum(mpmath.mpf(float(w)) * mpmath.mpf(float(v)) for w, v in zip(row, x)) for row in W]
            zmax = max(z)
            e = [mpmath.exp(v - zmax) for v in z]
            s = mpmath.fsum(e)
            p = [v / s for v in e]
            mus.append(mpmath.sqrt(mpmath.fsum((pj - (1 if j == yi else 0)) ** 2 for j, pj in enumerate(p))))
            nus.append(1 - mpmath.fsum(pj * pj for pj in p))
        return float(mpmath.fsum(mus) / len(mus)), float(mpmath.fsum(nus) / len(nus))


@given(problems(max_n=4, scale=2.0), st.sampled_from([1.0, 10.0, 30.0, 100.0]))
@example(_saturated(), 0.2)
def test_mu_nu_keep_full_relative_accuracy_near_saturation(prob, scale):
    """Against high-precision arithmetic: no cancellation in 1 - p_y or 1 - ‖p‖²
    when the softmax saturates (large scale)."""
    W, X, y = prob
    W = scale * W
    mu_ref, nu_ref = _mpmath_mu_nu(W, X, y)
    assert bound.mu(W, X, y) == pytest.approx(mu_ref, rel=1e-9, abs=1e-300)
    assert bound.nu(W, X, y) == pytest.approx(nu_ref, rel=1e-9, abs=1e-300)


def test_saturated_softmax_is_stable_and_finite():
    W, X, y = _saturated()
    m, v = bound.mu(W, X, y), bound.nu(W, X, y)
    # two examples certain and correct (≈0), one certain and wrong: ‖p - e_y‖ = sqrt 2
    assert m == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    assert 0 <= v < 1e-80
    tl = bound.truncated_loss(W, X, y, B=7.0)
    assert np.all(np.isfinite(tl)) and tl[2] == 7.0 and tl[0] < 1e-80


# ---------------------------------------------------------------------------
# the (2,1) norm
# ---------------------------------------------------------------------------

mats = st.integers(1, 4).flatmap(
    lambda r: st.integers(1, 4).flatmap(
        lambda k: st.tuples(
            hnp.arrays(np.float64, (r, k), elements=_floats(-5, 5)),
            hnp.arrays(np.float64, (r, k), elements=_floats(-5, 5)),
        )
    )
)


@given(mats, _floats(-4, 4))
def test_norm_2_1_is_a_norm_above_frobenius(pair, a):
    M, N = pair
    nM = bound.norm_2_1(M)
    assert nM == pytest.approx(sum(math.sqrt(sum(v * v for v in col)) for col in M.T), rel=1e-12, abs=1e-300)
    assert bound.norm_2_1(a * M) == pytest.approx(abs(a) * nM, rel=1e-12, abs=1e-12)
    assert bound.norm_2_1(M + N) <= nM + bound.norm_2_1(N) + 1e-12
    fro = float(np.linalg.norm(M))
    assert nM >= fro - 1e-12
    assert nM <= math.sqrt(M.shape[1]) * fro + 1e-12


@given(problems())
def test_weight_norm_is_the_sum_of_class_row_norms(prob):
    W = prob[0]
    assert bound.weight_norm(W) == pytest.approx(float(np.linalg.norm(W, axis=1).sum()), rel=1e-12, abs=1e-300)
    assert bound.weight_norm(W) == pytest.approx(bound.norm_2_1(W.T), rel=1e-15, abs=1e-300)


# ---------------------------------------------------------------------------
# numpy vs torch, θ, ζ, the truncated loss, the theorem
# ---------------------------------------------------------------------------


@given(problems(max_n=6))
@example(_saturated())
def test_numpy_and_torch_inputs_agree(prob):
    W, X, y = prob
    Wt, Xt, yt = torch.from_numpy(W), torch.from_numpy(X), torch.from_numpy(y)
    assert bound.mu(Wt, Xt, yt) == bound.mu(W, X, y)
    assert bound.nu(Wt, Xt, yt) == bound.nu(W, X, y)
    assert bound.weight_norm(Wt) == bound.weight_norm(W)
    a, b = bound.truncated_loss(W, X, y, 2.5), bound.truncated_loss(Wt, Xt, yt, 2.5)
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    assert b.dtype == F64 and a.dtype == np.float64 and a.shape == (X.shape[0],)
    np.testing.assert_array_equal(a, b.numpy())
    # float32 torch input is computed in float64 too
    assert bound.mu(Wt.float(), Xt.float(), yt) == pytest.approx(bound.mu(W.astype(np.float32), X.astype(np.float32), y))
    assert isinstance(bound.mu(Wt, Xt, yt), float)


@given(problems(max_n=6), _floats(0.05, 10))
def test_truncated_loss_is_min_of_B_and_cross_entropy(prob, B):
    W, X, y = prob
    Z = torch.from_numpy(X) @ torch.from_numpy(W).T
    ce = torch.nn.functional.cross_entropy(Z, torch.from_numpy(y), reduction="none").numpy()
    np.testing.assert_allclose(bound.truncated_loss(W, X, y, B), np.minimum(B, ce), rtol=1e-12, atol=1e-14)


def test_theta_and_zeta_by_hand():
    X = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    assert bound.theta(X, 4) == pytest.approx(math.log(12) ** 3 * 25.0, rel=1e-14)
    assert bound.zeta(2.0, 0.1, 100) == pytest.approx(2.0 * (math.log(10) + math.log(math.log(100))) / 100, rel=1e-14)


def test_theorem_terms_by_hand_and_the_gap():
    rng = np.random.default_rng(3)
    W, X, y = rng.normal(size=(3, 4)), rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    Xs, ys = rng.normal(size=(9, 4)), rng.integers(0, 3, 9)
    B, delta, A = 2.0, 0.05, 1.5 * bound.weight_norm(W)
    t = bound.theorem_4_1(W, X, y, B=B, delta=delta, A=A, constant=3.0, X_test=Xs, y_test=ys)
    n, m, v = 20, bound.mu(W, X, y), bound.nu(W, X, y)
    th = math.log(20 * 3) ** 3 * float((X * X).sum(1).max())
    assert (t.mu, t.nu, t.A, t.n, t.c, t.d) == (m, v, A, 20, 3, 4)
    assert t.theta == pytest.approx(th, rel=1e-14)
    assert t.term_mu == pytest.approx((A * m) ** (2 / 3) * (th * B) ** (1 / 3) / n ** (1 / 3), rel=1e-12)
    assert t.term_nu == pytest.approx(math.sqrt(A**2 * B * v * th / n), rel=1e-12)
    assert t.term_third == pytest.approx(B * A**2 * th / (n * (math.log(B * A**2 * th / (v * n)) ** 2 + 1)), rel=1e-12)
    assert t.zeta == pytest.approx(B * (math.log(1 / delta) + math.log(math.log(n))) / n, rel=1e-12)
    assert t.rhs == pytest.approx(3.0 * (t.term_mu + t.term_nu + t.term_third + t.zeta), rel=1e-14)
    tr = float(bound.truncated_loss(W, X, y, B).mean())
    te = float(bound.truncated_loss(W, Xs, ys, B).mean())
    assert t.train_truncated_loss == pytest.approx(tr, rel=1e-14)
    assert t.test_truncated_loss == pytest.approx(te, rel=1e-14)
    assert t.observed_gap == pytest.approx(te - 1.01 * tr, rel=1e-12, abs=1e-14)
    # A defaults to ‖Wᵀ‖_{2,1}; terms grow with A; no test data -> no gap
    t0 = bound.theorem_4_1(W, X, y, B=B, delta=delta)
    assert t0.A == t0.weight_norm == bound.weight_norm(W)
    assert t0.observed_gap is None and t0.test_truncated_loss is None
    assert t0.term_mu < t.term_mu and t0.term_nu < t.term_nu
    with pytest.raises(Exception):
        t0.mu = 0.0  # frozen
    assert set(t.as_dict()) >= {"term_mu", "term_nu", "term_third", "zeta", "rhs", "observed_gap"}


def test_theorem_torch_and_numpy_give_the_same_terms():
    rng = np.random.default_rng(5)
    W, X, y = rng.normal(size=(4, 3)), rng.normal(size=(10, 3)), rng.integers(0, 4, 10)
    a = bound.theorem_4_1(W, X, y, B=3.0, delta=0.1, X_test=X[:4], y_test=y[:4])
    b = bound.theorem_4_1(torch.from_numpy(W), torch.from_numpy(X), torch.from_numpy(y), B=3.0, delta=0.1,
                          X_test=torch.from_numpy(X[:4]), y_test=torch.from_numpy(y[:4]))
    assert a == b


def test_third_term_limits():
    assert bound.term_third(0.0, 0.3, 10.0, 2.0, 50) == 0.0
    assert bound.term_third(2.0, 0.0, 10.0, 2.0, 50) == 0.0
    assert bound.term_third(2.0, 1e-300, 10.0, 2.0, 50) < 1e-2


# ---------------------------------------------------------------------------
# the explicit penalty (dropout on the input of a linear model)
# ---------------------------------------------------------------------------


@given(problems(max_n=4, max_c=4, max_d=4), st.sampled_from([0.1, 0.4, 0.5, 0.8]))
@example(_saturated(), 0.5)
def test_explicit_penalty_matches_autograd_input_hessian_and_gauss_newton(prob, q):
    W, X, y = prob
    lam = q / (2 * (1 - q))
    Hx = _input_hessians(W, X, y)  # (n, d, d) = Wᵀ H_out W exactly (the model is linear)
    ref = lam * float(((torch.from_numpy(X) ** 2) * torch.diagonal(Hx, dim1=1, dim2=2)).sum(1).mean())
    # Gauss-Newton J^T H J with the explicit Jacobian J = ∂z/∂x of autograd
    Wt = torch.from_numpy(W)
    gn = []
    for x in torch.from_numpy(X):
        J = torch.autograd.functional.jacobian(lambda xx: Wt @ xx, x)
        p = torch.softmax(Wt @ x, 0)
        H = torch.diag(p) - torch.outer(p, p)
        gn.append(float(torch.sum(x**2 * torch.diagonal(J.T @ H @ J))))
    assert bound.explicit_penalty_linear(W, X, q) == pytest.approx(ref, rel=1e-9, abs=1e-13)
    assert bound.explicit_penalty_linear(W, X, q) == pytest.approx(lam * float(np.mean(gn)), rel=1e-9, abs=1e-13)


@given(problems(max_n=3, max_c=3, max_d=4, scale=2.0), st.sampled_from([0.05, 0.3, 0.5]))
def test_explicit_penalty_equals_the_second_order_term_by_exact_mask_enumeration(prob, q):
    """Enumerate every input mask m ∈ {0,1}^d with its probability: the
    dropout perturbation is δ = (m/(1-q) - 1) ⊙ x, and
    E_m[½ δᵀ D²_x ℓ δ] is the second-order Taylor term R_taylor (4.2), which
    for a linear model equals the λ-weighted penalty exactly.  (It is not the
    exact dropout gap R_drop; that is deliberately not asserted.)"""
    W, X, y = prob
    d = X.shape[1]
    Hx = _input_hessians(W, X, y)
    Xt = torch.from_numpy(X)
    total = torch.zeros((), dtype=F64)
    for mask in itertools.product((0.0, 1.0), repeat=d):
        m = torch.tensor(mask, dtype=F64)
        prob_m = float(np.prod([(1 - q) if v else q for v in mask]))
        delta = (m / (1 - q) - 1) * Xt  # (n, d)
        quad = torch.einsum("ni,nij,nj->n", delta, Hx, delta)
        total = total + prob_m * 0.5 * quad.mean()
    assert bound.explicit_penalty_linear(W, X, q) == pytest.approx(float(total), rel=1e-9, abs=1e-13)


def test_explicit_penalty_is_differentiable_and_label_free():
    rng = np.random.default_rng(1)
    W = torch.tensor(rng.normal(size=(3, 4)), requires_grad=True)
    X = torch.tensor(rng.normal(size=(6, 4)))
    assert torch.autograd.gradcheck(lambda w: bound.explicit_penalty_linear(w, X, 0.4), (W,))
    R = bound.explicit_penalty_linear(W, X, 0.4)
    assert isinstance(R, torch.Tensor) and R.dim() == 0 and R.requires_grad
    R = R.detach()
    assert isinstance(bound.explicit_penalty_linear(W.detach().numpy(), X.numpy(), 0.4), float)
    assert bound.explicit_penalty_linear(W, X, 0.0) == 0.0
    assert float(bound.explicit_penalty_linear(W.detach(), X, 0.4, coef=1.0)) == pytest.approx(float(R) / bound.dropout_lambda(0.4))


# ---------------------------------------------------------------------------
# the implicit noise
# ---------------------------------------------------------------------------


def _xi_autograd(W, X, y, eta):
    """ξ = ∇_W (1/n) Σ_n J_loss,n (η_n ⊙ x_n) by double backward."""
    Wt = torch.tensor(W, requires_grad=True)
    Xt = torch.tensor(X, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(Xt @ Wt.T, torch.from_numpy(y), reduction="sum")
    (Jx,) = torch.autograd.grad(loss, Xt, create_graph=True)  # rows: J_loss,n
    s = (Jx * torch.from_numpy(eta) * Xt).sum() / X.shape[0]
    (g,) = torch.autograd.grad(s, Wt)
    return g.detach().numpy()


def _xi_finite_difference(W, X, y, eta, eps=1e-5):
    """[∇_W L(x + εη⊙x) - ∇_W L(x - εη⊙x)] / (2ε) (MATH.md), L the mean loss."""
    def grad_at(Xp):
        Wt = torch.tensor(W, requires_grad=True)
        L = torch.nn.functional.cross_entropy(torch.from_numpy(Xp) @ Wt.T, torch.from_numpy(y))
        return torch.autograd.grad(L, Wt)[0].numpy()

    return (grad_at(X + eps * eta * X) - grad_at(X - eps * eta * X)) / (2 * eps)


@given(problems(max_n=5, max_c=4, max_d=4), st.integers(0, 2**31 - 1))
@example(_saturated(), 0)
def test_implicit_noise_matches_double_backward_and_finite_difference(prob, seed):
    W, X, y = prob
    eta = np.random.default_rng(seed).normal(size=X.shape)
    xi = bound.implicit_noise_linear(W, X, y, 0.5, eta=eta)
    assert isinstance(xi, np.ndarray) and xi.shape == W.shape
    np.testing.assert_allclose(xi, _xi_autograd(W, X, y, eta), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xi, _xi_finite_difference(W, X, y, eta), rtol=1e-5, atol=1e-7)
    # linear in η: zero mean under a symmetric η
    np.testing.assert_allclose(bound.implicit_noise_linear(W, X, y, 0.5, eta=-eta), -xi, rtol=1e-12, atol=1e-15)


def test_implicit_noise_sampling_is_scaled_rademacher_and_reproducible():
    rng = np.random.default_rng(2)
    W, X, y = rng.normal(size=(3, 1)), np.ones((1, 1)), np.array([1])
    q = 0.3
    s = math.sqrt(q / (1 - q))
    xi_plus = bound.implicit_noise_linear(W, X, y, q, eta=np.array([[s]]))
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xi = bound.implicit_noise_linear(torch.from_numpy(W), X, y, q, generator=g)
        assert isinstance(xi, torch.Tensor)
        sign = 1 if np.allclose(xi.numpy(), xi_plus) else (-1 if np.allclose(xi.numpy(), -xi_plus) else 0)
        assert sign != 0
        seen.add(sign)
    assert seen == {1, -1}
    a = bound.implicit_noise_linear(W, X, y, q, generator=torch.Generator().manual_seed(7))
    b = bound.implicit_noise_linear(W, X, y, q, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

_W = np.ones((3, 2))
_X = np.ones((4, 2))
_y = np.array([0, 1, 2, 0])

BAD = [
    ("shape", lambda: bound.mu(np.ones((3, 5)), _X, _y), "features"),
    ("y length", lambda: bound.nu(_W, _X, _y[:3]), "3 entries but X has 4 rows"),
    ("y float", lambda: bound.mu(_W, _X, _y.astype(float)), "integer"),
    ("y torch float", lambda: bound.mu(_W, _X, torch.tensor([0.0, 1, 2, 0])), "integer"),
    ("y range high", lambda: bound.mu(_W, _X, np.array([0, 1, 3, 0])), r"\[0, 3\)"),
    ("y range neg", lambda: bound.mu(_W, _X, np.array([0, -1, 2, 0])), r"\[0, 3\)"),
    ("y 2d", lambda: bound.mu(_W, _X, _y[:, None]), "shape"),
    ("W 1d", lambda: bound.mu(np.ones(2), _X, _y), "dimension"),
    ("nan X", lambda: bound.mu(_W, np.array([[0, np.nan]] * 4), _y), "non-finite"),
    ("inf W", lambda: bound.weight_norm(np.array([[np.inf, 0.0]])), "non-finite"),
    ("B zero", lambda: bound.truncated_loss(_W, _X, _y, 0.0), "B"),
    ("B neg", lambda: bound.theorem_4_1(_W, _X, _y, B=-1, delta=0.1), "B"),
    ("B nan", lambda: bound.zeta(float("nan"), 0.1, 10), "B"),
    ("delta 0", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.0), "δ"),
    ("delta 1", lambda: bound.zeta(1.0, 1.0, 10), "δ"),
    ("delta big", lambda: bound.zeta(1.0, 1.5, 10), "δ"),
    ("A small", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, A=1.0), "‖Wᵀ‖"),
    ("A nan", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, A=float("nan")), "A must"),
    ("n small", lambda: bound.theorem_4_1(_W, _X[:2], _y[:2], B=1, delta=0.1), "n must"),
    ("constant", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, constant=0), "constant"),
    ("test half", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, X_test=_X), "X_test and y_test"),
    ("test shape", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, X_test=np.ones((2, 5)),
                                             y_test=np.array([0, 1])), "X_test"),
    ("test labels", lambda: bound.theorem_4_1(_W, _X, _y, B=1, delta=0.1, X_test=_X,
                                              y_test=np.array([0, 1, 2, 5])), "y_test"),
    ("theta c", lambda: bound.theta(_X, 0), "classes"),
    ("q one", lambda: bound.explicit_penalty_linear(_W, _X, 1.0), r"\[0, 1\)"),
    ("q neg", lambda: bound.implicit_noise_linear(_W, _X, _y, -0.1), r"\[0, 1\)"),
    ("eta shape", lambda: bound.implicit_noise_linear(_W, _X, _y, 0.5, eta=np.ones((4, 3))), "eta"),
    ("strings", lambda: bound.norm_2_1(np.array([["a"]])), "numeric"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(name, call, match):
    with pytest.raises(DropcheckError, match=match):
        call()


def test_A_equal_to_the_norm_up_to_rounding_is_accepted():
    W = np.random.default_rng(0).normal(size=(3, 2))
    a = bound.weight_norm(W)
    assert bound.theorem_4_1(W, _X, _y, B=1, delta=0.1, A=a * (1 - 1e-13)).A == a * (1 - 1e-13)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def _args(*argv):
    from dropcheck import _cli_bound

    p = argparse.ArgumentParser()
    _cli_bound.add_arguments(p)
    return p.parse_args(list(argv))


def _tiny_npz(path, with_test=True, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 5)) * 2
    y = np.arange(30) % 3
    X = centers[y] + rng.normal(size=(30, 5))
    arrays = {"X": X, "y": y + 1}  # labels 1..3 are remapped to 0..2
    if with_test:
        yt = np.arange(12) % 3
        arrays.update(X_test=centers[yt] + rng.normal(size=(12, 5)), y_test=yt + 1)
    np.savez(path, **arrays)
    return path


def test_cli_runs_end_to_end_on_a_tiny_data_set(tmp_path, capsys):
    from dropcheck import _cli_bound

    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "out"
    rc = _cli_bound.run(_args("--data", str(data), "--out", str(out), "--epochs", "3", "--seed", "1",
                              "--batch-size", "8"))
    assert rc == 0
    for f in ("bound.csv", "bound.json", "bound.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    payload = json.loads((out / "bound.json").read_text())
    assert payload["config"]["classes"] == 3 and payload["config"]["n_train"] == 30
    assert set(payload["final"]) == set(_cli_bound.REGULARIZERS)
    for reg, hist in payload["history"].items():
        assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
        last = hist[-1]
        for k in ("mu", "nu", "weight_norm", "term_mu", "term_nu", "term_third", "zeta", "rhs", "observed_gap"):
            assert math.isfinite(last[k])
        assert last["rhs"] == pytest.approx(last["term_mu"] + last["term_nu"] + last["term_third"] + last["zeta"])
    rows = list(csv.DictReader((out / "bound.csv").open()))
    assert len(rows) == 5 * 4
    assert (out / "bound.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "explicit+implicit" in printed and "q=0.5" in printed

    # same seed, same results
    out2 = tmp_path / "out2"
    _cli_bound.run(_args("--data", str(data), "--out", str(out2), "--epochs", "3", "--seed", "1",
                         "--batch-size", "8", "--no-plot"))
    assert json.loads((out2 / "bound.json").read_text())["history"] == payload["history"]


def test_cli_default_digits_and_csv_data(tmp_path):
    from dropcheck import _cli_bound
    from dropcheck.cli import main

    out = tmp_path / "digits"
    assert main(["bound", "--out", str(out), "--epochs", "1", "--no-plot",
                 "--regularizers", "none,explicit+implicit"]) == 0
    cfg = json.loads((out / "bound.json").read_text())["config"]
    assert (cfg["classes"], cfg["features"], cfg["n_train"] + cfg["n_test"]) == (10, 64, 1797)
    assert cfg["B"] == pytest.approx(2 * math.log(10))

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = (X[:, 0] > 0).astype(int)
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,label\n" + "\n".join(",".join(map(str, [*x, t])) for x, t in zip(X, y)) + "\n")
    Xtr, ytr, Xte, yte, name = _cli_bound.load_data(path, 0.25)
    assert Xtr.shape == (15, 3) and Xte.shape == (5, 3) and set(np.unique(np.r_[ytr, yte])) <= {0, 1}
    np.testing.assert_allclose(Xtr.mean(0), 0, atol=1e-12)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        (b"not a zip", "not a readable .npz"),
        ({"X": np.ones((5, 2))}, "'X' and 'y'"),
        ({"X": np.ones((5, 2)), "y": np.array([0, 1, 0, 1, 0.5])}, "integer class labels"),
        ({"X": np.ones((5, 2)), "y": np.array([0, 1, 0])}, "5 rows but y has 3"),
        ({"X": np.array([[0, np.nan]] * 5), "y": np.array([0, 1, 0, 1, 0])}, "non-finite"),
        ({"X": np.ones((5, 2)), "y": np.zeros(5, int)}, "2 classes"),
        ({"X": np.ones((5, 2)), "y": np.arange(5) % 2, "X_test": np.ones((2, 2))}, "both"),
    ],
)
def test_bad_data_files_give_a_clear_error(tmp_path, content, match):
    from dropcheck import _cli_bound

    path = tmp_path / "d.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    with pytest.raises(DataError, match=match):
        _cli_bound.load_data(path)


def test_bad_csv_and_extension_and_the_cli_exit_code(tmp_path, capsys):
    from dropcheck import _cli_bound
    from dropcheck.cli import main

    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match="line 2"):
        _cli_bound.load_data(p)
    p.write_text("1,2,0\n3,1\n")
    with pytest.raises(DataError, match="different numbers of columns"):
        _cli_bound.load_data(p)
    q = tmp_path / "d.txt"
    q.write_text("1,2,0\n")
    with pytest.raises(DataError, match="unknown format"):
        _cli_bound.load_data(q)
    assert main(["bound", "--data", str(q), "--out", str(tmp_path / "o")]) == 2
    assert "unknown format" in capsys.readouterr().err
    with pytest.raises(DropcheckError, match="regularizer"):
        _cli_bound.run(_args("--regularizers", "none,bogus", "--out", str(tmp_path / "o")))
