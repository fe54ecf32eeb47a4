"""Tests of ``dropcheck.linear``: the closed-form dropout penalty and noise
of a linear softmax model against autograd input Hessians, exact enumeration
of dropout masks, double backward and central finite differences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bound_cases import F64, _input_hessians, _saturated, problems
from dropcheck import DropcheckError, linear

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
    assert linear.explicit_penalty_linear(W, X, q) == pytest.approx(ref, rel=1e-9, abs=1e-13)
    assert linear.explicit_penalty_linear(W, X, q) == pytest.approx(lam * float(np.mean(gn)), rel=1e-9, abs=1e-13)


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
    assert linear.explicit_penalty_linear(W, X, q) == pytest.approx(float(total), rel=1e-9, abs=1e-13)


def test_explicit_penalty_is_differentiable_and_label_free():
    rng = np.random.default_rng(1)
    W = torch.tensor(rng.normal(size=(3, 4)), requires_grad=True)
    X = torch.tensor(rng.normal(size=(6, 4)))
    assert torch.autograd.gradcheck(lambda w: linear.explicit_penalty_linear(w, X, 0.4), (W,))
    R = linear.explicit_penalty_linear(W, X, 0.4)
    assert isinstance(R, torch.Tensor) and R.dim() == 0 and R.requires_grad
    R = R.detach()
    assert isinstance(linear.explicit_penalty_linear(W.detach().numpy(), X.numpy(), 0.4), float)
    assert linear.explicit_penalty_linear(W, X, 0.0) == 0.0
    assert float(linear.explicit_penalty_linear(W.detach(), X, 0.4, coef=1.0)) == pytest.approx(float(R) / linear.dropout_lambda(0.4))


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
    xi = linear.implicit_noise_linear(W, X, y, 0.5, eta=eta)
    assert isinstance(xi, np.ndarray) and xi.shape == W.shape
    np.testing.assert_allclose(xi, _xi_autograd(W, X, y, eta), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xi, _xi_finite_difference(W, X, y, eta), rtol=1e-5, atol=1e-7)
    # linear in η: zero mean under a symmetric η
    np.testing.assert_allclose(linear.implicit_noise_linear(W, X, y, 0.5, eta=-eta), -xi, rtol=1e-12, atol=1e-15)


def test_implicit_noise_sampling_is_scaled_rademacher_and_reproducible():
    rng = np.random.default_rng(2)
    W, X, y = rng.normal(size=(3, 1)), np.ones((1, 1)), np.array([1])
    q = 0.3
    s = math.sqrt(q / (1 - q))
    xi_plus = linear.implicit_noise_linear(W, X, y, q, eta=np.array([[s]]))
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xi = linear.implicit_noise_linear(torch.from_numpy(W), X, y, q, generator=g)
        assert isinstance(xi, torch.Tensor)
        sign = 1 if np.allclose(xi.numpy(), xi_plus) else (-1 if np.allclose(xi.numpy(), -xi_plus) else 0)
        assert sign != 0
        seen.add(sign)
    assert seen == {1, -1}
    a = linear.implicit_noise_linear(W, X, y, q, generator=torch.Generator().manual_seed(7))
    b = linear.implicit_noise_linear(W, X, y, q, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(a, b)


_W = np.ones((3, 2))
_X = np.ones((4, 2))
_y = np.array([0, 1, 2, 0])

BAD = [
    ("q one", lambda: linear.explicit_penalty_linear(_W, _X, 1.0), r"\[0, 1\)"),
    ("q neg", lambda: linear.implicit_noise_linear(_W, _X, _y, -0.1), r"\[0, 1\)"),
    ("eta shape", lambda: linear.implicit_noise_linear(_W, _X, _y, 0.5, eta=np.ones((4, 3))), "eta"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(name, call, match):
    with pytest.raises(DropcheckError, match=match):
        call()
