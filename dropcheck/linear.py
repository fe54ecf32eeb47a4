"""Dropout on the input of a linear softmax model, in closed form.

The quantities a training run of a linear model needs (``dropcheck bound``
trains with them; ``training/studies/bound_runs.py``): the dropout-matched
coefficient ``λ = q/(2(1-q))``, the explicit regularizer (4.2)-(4.4) and one
sample of the implicit noise (4.5)-(4.6), all for dropout with probability
``q`` on the input ``x`` of ``z = W x``.  Conventions as in
:mod:`dropcheck.bound` (``W (c, d)``, ``X (n, d)``, ``y (n,)``; float64;
numpy or torch in, the same kind out; bad input raises ``DropcheckError``).
Unlike the theorem's terms these keep torch tensors, so the penalty can be
differentiated and the noise added to a gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._errors import DropcheckError
from ._sites import _check_q, dropout_lambda
from .bound import _DTYPE, _check_model, _is_torch, _out, _to_float

__all__ = ["dropout_lambda", "explicit_penalty_linear", "implicit_noise_linear"]  # dropout_lambda: re-exported


def explicit_penalty_linear(W, X, q, *, coef=None):
    """Dropout-matched explicit regularizer of a linear softmax model with
    dropout (probability ``q``) on its input, in closed form.

    ``R(W) = λ · (1/n) Σ_n Σ_k x_nk² (Wᵀ H_n W)_kk``,
    ``H_n = diag(p_n) - p_n p_nᵀ``, ``p_n = softmax(W x_n)``,
    ``λ = q/(2(1-q))`` (docs/math.md; (4.2)-(4.4) with ``J_F = W``, ``h = x``).
    ``(Wᵀ H W)_kk = Σ_c p_c W_ck² - (Σ_c p_c W_ck)²``, so
    ``R = λ · mean_n Σ_k x_nk² [(P W²)_nk - (P W)_nk²]`` with ``P (n, c)``.

    This is Wager et al.'s quadratic dropout penalty extended to softmax.
    For a linear model only the softmax follows the dropout site, so this
    equals the second-order Taylor term ``R_taylor`` exactly (and the
    λ-weighted Gauss-Newton ``R_approx``), but *not* the exact dropout gap
    ``R_drop``.  It does not depend on the labels.

    Shapes: ``W (c, d)``, ``X (n, d)``.  ``coef`` overrides ``λ`` (e.g. the
    ``q/(1-q)`` variant).  Returns a 0-dim float64 torch tensor
    (differentiable in ``W`` when ``W`` requires grad) if ``W`` or ``X`` is a
    torch tensor, else a Python float.
    """
    lam = dropout_lambda(q) if coef is None else float(coef)
    Wt, Xt, _ = _check_model(W, X)
    P = torch.softmax(Xt @ Wt.T, dim=1)
    diag = P @ (Wt * Wt) - (P @ Wt) ** 2  # (n, d): (Wᵀ H_n W)_kk
    R = lam * ((Xt * Xt) * diag).sum(1).mean()
    return R if _is_torch(W, X) else float(R)


def implicit_noise_linear(W, X, y, q, *, eta=None, generator: Optional[torch.Generator] = None):
    """One sample of the analytic dropout gradient noise (4.5)-(4.6) of a
    linear softmax model with dropout (probability ``q``) on its input.

    ``ξ_approx = ∇_W (1/n) Σ_n J_loss,n (η_n ⊙ x_n)`` with
    ``J_loss,n = ∂ℓ/∂x = (p_n - e_{y_n})ᵀ W``; the gradient goes through
    ``J_loss`` (both ``W`` and ``p``).  In closed form, with
    ``u_n = η_n ⊙ x_n`` and ``v_n = W u_n``:

        ξ_approx = (1/n) Σ_n [ (p_n - e_{y_n}) u_nᵀ + (H_n v_n) x_nᵀ ],
        H_n v = p ⊙ v - p (pᵀ v).

    ``η`` (shape ``(n, d)``) defaults to ``sqrt(q/(1-q))`` times independent
    Rademacher signs per example and feature (the paper's choice; same
    covariance as dropout's ``η``), drawn from ``generator``.  Shapes:
    ``W (c, d)``, ``X (n, d)``, ``y (n,)``; returns ``(c, d)`` float64 (torch
    tensor if any input is one, else numpy), detached.
    """
    qf = _check_q(q, "linear dropout")
    Wt, Xt, yt = _check_model(W, X, y)
    n, d = Xt.shape
    if eta is None:
        signs = torch.randint(0, 2, (n, d), generator=generator, dtype=torch.int64).to(_DTYPE) * 2 - 1
        et = math.sqrt(qf / (1.0 - qf)) * signs
    else:
        et = _to_float(eta, "eta", 2)
        if tuple(et.shape) != (n, d):
            raise DropcheckError(f"eta must have the shape of X {(n, d)}, got {tuple(et.shape)}")
    with torch.no_grad():
        Wd = Wt.detach()
        P = torch.softmax(Xt @ Wd.T, dim=1)
        G = P - torch.nn.functional.one_hot(yt, Wd.shape[0]).to(_DTYPE)
        U = et * Xt
        V = U @ Wd.T  # (n, c)
        M = P * V - P * (P * V).sum(1, keepdim=True)  # rows H_n v_n
        xi = (G.T @ U + M.T @ Xt) / n
    return _out(xi, _is_torch(W, X, y, eta))
