"""Tests of ``dropcheck.bound`` (Theorem 4.1 on linear models).

Every closed form is checked against an independent route: autograd
Jacobians/Hessians of the cross-entropy in the logits (μ, ν).  The
linear-dropout penalty and noise are in ``test_linear.py``, the
``dropcheck bound`` command in ``tests/training/test_bound_runs.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bound_cases import F64, _autograd_mu_nu, _floats, _saturated, problems
from dropcheck import DropcheckError, bound

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
