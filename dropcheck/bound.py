"""Theorem 4.1 of Wei, Kakade & Ma (ICML 2020) for linear softmax models.

Conventions (docs/math.md, "Theorem 4.1"):

- ``W`` has shape ``(c, d)`` (classes × features), ``X`` has shape ``(n, d)``
  (one example per row), ``y`` has shape ``(n,)`` of integer labels in
  ``[0, c)``; the logits are ``z_i = W x_i``, i.e. ``Z = X Wᵀ`` of shape
  ``(n, c)``.
- Loss ``ℓ_y(z) = -log softmax(z)_y``; ``p = softmax(z)``;
  ``D ℓ_y[z] = p - e_y``; ``D² ℓ_y[z] = diag(p) - ppᵀ``.
- Truncated loss ``ℓ̄ = min(B, ℓ)``.
- ``‖M‖_{2,1} = Σ_j sqrt(Σ_i M_ij²)`` (sum of column norms); the theorem uses
  ``‖Wᵀ‖_{2,1}``, the sum over classes of the row norms of ``W``.

Inputs may be numpy arrays or torch tensors (or anything ``numpy.asarray``
accepts).  Everything is computed in float64 with a stable log-softmax and
without a Python loop over examples.  Array outputs are torch tensors when any
array input is a torch tensor, numpy arrays otherwise; scalar outputs are
Python floats.  The closed-form dropout penalty and noise of a linear model
(what a training run adds to its loss and gradient) live in
:mod:`dropcheck.linear`.

Bad input raises :class:`dropcheck._errors.DropcheckError` naming the problem:
mismatched shapes, labels that are not integers or lie outside ``[0, c)``,
``B ≤ 0``, ``δ`` outside ``(0, 1)``, ``q`` outside ``[0, 1)``, non-finite
values, and ``A < ‖Wᵀ‖_{2,1}`` (the theorem's class condition: the bound is
stated only for ``W`` with ``‖Wᵀ‖_{2,1} ≤ A``; this is an *error*, not a
warning, because a right-hand side computed for a class that does not contain
``W`` says nothing about ``W``).

The right-hand side (docs/math.md; the paper states it up to a universal constant,
``≲``, exposed here as ``constant``, default 1):

    E_P[ℓ̄] - 1.01 E_{P_n}[ℓ̄]
        ≲ (A μ)^{2/3} (θ B)^{1/3} / n^{1/3}                       (term_mu)
        + sqrt(A² B ν θ / n)                                      (term_nu)
        + B A² θ / (n (log²(B A² θ / (ν n)) + 1))                 (term_third)
        + ζ,      ζ = B (log(1/δ) + log log n) / n                (zeta)

with ``μ = mean ‖p - e_y‖₂``, ``ν = mean (1 - ‖p‖₂²)`` and
``θ = log³(n c) · max_i ‖x_i‖₂²``.  docs/math.md notes that the printed form of the
three main terms could not be checked against the paper's appendix; each is a
separate one-line function below so a corrected form is a one-line change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ._errors import DropcheckError

__all__ = [
    "BoundTerms",
    "mu",
    "nu",
    "norm_2_1",
    "weight_norm",
    "theta",
    "zeta",
    "truncated_loss",
    "term_mu",
    "term_nu",
    "term_third",
    "theorem_4_1",
]

_DTYPE = torch.float64


# ---------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------


def _is_torch(*arrays) -> bool:
    return any(isinstance(a, torch.Tensor) for a in arrays)


def _to_float(a, name: str, ndim: int) -> torch.Tensor:
    """``a`` as a float64 torch tensor of ``ndim`` dims with finite entries.

    Torch tensors keep their autograd graph (``.to`` is differentiable)."""
    if isinstance(a, torch.Tensor):
        t = a
    else:
        try:
            arr = np.asarray(a)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise DropcheckError(f"{name} could not be read as an array: {exc}") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DropcheckError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise DropcheckError(f"{name} must be real, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise DropcheckError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    t = t.to(_DTYPE)
    if not torch.isfinite(t).all():
        raise DropcheckError(f"{name} contains non-finite values (NaN or inf)")
    return t


def _to_labels(y, n: int, c: int) -> torch.Tensor:
    """``y`` as an int64 tensor of shape ``(n,)`` with values in ``[0, c)``."""
    if isinstance(y, torch.Tensor):
        t = y
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise DropcheckError(f"labels y must be integer class indices, got dtype {t.dtype}")
    else:
        arr = np.asarray(y)
        if not np.issubdtype(arr.dtype, np.integer):
            raise DropcheckError(f"labels y must be integer class indices, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() != 1:
        raise DropcheckError(f"labels y must have shape (n,), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise DropcheckError(f"labels y have {t.shape[0]} entries but X has {n} rows (examples)")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= c):
        raise DropcheckError(
            f"labels y must lie in [0, {c}) for W with {c} classes (rows), "
            f"got range [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _check_model(W, X, y=None):
    """Validate ``W (c, d)``, ``X (n, d)``, ``y (n,)``; return torch versions."""
    Wt = _to_float(W, "W", 2)
    Xt = _to_float(X, "X", 2)
    c, d = Wt.shape
    n, dx = Xt.shape
    if c < 1 or d < 1:
        raise DropcheckError(f"W must have shape (c, d) with c, d ≥ 1, got {tuple(Wt.shape)}")
    if dx != d:
        raise DropcheckError(
            f"X has {dx} features (columns) but W has {d}: expected W of shape (c, d) "
            f"and X of shape (n, d), got W {tuple(Wt.shape)} and X {tuple(Xt.shape)}"
        )
    if n < 1:
        raise DropcheckError("X has no examples (rows)")
    yt = None if y is None else _to_labels(y, n, c)
    return Wt, Xt, yt


def _positive(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as exc:
        raise DropcheckError(f"{name} must be a number, got {v!r}") from exc
    if not math.isfinite(f) or f <= 0:
        raise DropcheckError(f"{name} must be a finite number > 0, got {v!r}")
    return f


def _check_B(B) -> float:
    return _positive(B, "the truncation level B")


def _check_delta(delta) -> float:
    try:
        f = float(delta)
    except (TypeError, ValueError) as exc:
        raise DropcheckError(f"the confidence δ must be a number, got {delta!r}") from exc
    if not (0.0 < f < 1.0):
        raise DropcheckError(f"the confidence δ must lie in (0, 1), got {delta!r}")
    return f


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 3:
        raise DropcheckError(f"the sample size n must be an integer ≥ 3 (so that log log n > 0), got {n!r}")
    return int(n)


def _out(t: torch.Tensor, as_torch: bool):
    t = t.detach()
    return t if as_torch else t.numpy()


# ---------------------------------------------------------------------------
# softmax quantities (stable)
# ---------------------------------------------------------------------------


def _log_probs(Wt: torch.Tensor, Xt: torch.Tensor) -> torch.Tensor:
    """``log softmax(X Wᵀ)`` row-wise, shape ``(n, c)`` (stable)."""
    return torch.log_softmax(Xt @ Wt.T, dim=1)


def _one_minus_p(p: torch.Tensor) -> torch.Tensor:
    """``1 - p`` per entry of ``p (n, c)`` without cancellation.

    At each row's largest entry ``1 - p_max`` is computed as the sum of the
    *other* entries (``p_max → 1`` under saturation, where ``1 - p_max`` and
    even ``log p_max`` round to 0 in float64); every other entry has
    ``p ≤ 1/2``, where ``1 - p`` is accurate."""
    out = 1.0 - p
    j = p.argmax(1, keepdim=True)
    others = (p * (1.0 - torch.nn.functional.one_hot(j[:, 0], p.shape[1]).to(p.dtype))).sum(1, keepdim=True)
    return out.scatter(1, j, others)


def _mu_per_example(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖p_i - e_{y_i}‖₂`` per example, shape ``(n,)``.

    ``‖p - e_y‖² = Σ_{j≠y} p_j² + (1 - p_y)²`` with ``1 - p_y`` from
    :func:`_one_minus_p`, so a saturated, correct softmax keeps full relative
    accuracy instead of cancelling to 0."""
    p = logp.exp()
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    others = (p * p * (1 - onehot)).sum(1)
    one_minus_py = _one_minus_p(p).gather(1, y[:, None])[:, 0]
    return torch.sqrt(others + one_minus_py**2)


def _nu_per_example(logp: torch.Tensor) -> torch.Tensor:
    """``tr(diag(p) - ppᵀ) = 1 - ‖p‖² = Σ_j p_j (1 - p_j)`` per example, ``(n,)``
    (``1 - p_j`` from :func:`_one_minus_p`: no cancellation near saturation)."""
    p = logp.exp()
    return (p * _one_minus_p(p)).sum(1)


# ---------------------------------------------------------------------------
# the quantities of Theorem 4.1
# ---------------------------------------------------------------------------


def mu(W, X, y) -> float:
    """μ(W) of Theorem 4.1: the mean norm of the loss Jacobian in the logits.

    ``μ(W) = E_{P_n} ‖D ℓ_y[W x]‖₂ = (1/n) Σ_i ‖softmax(W x_i) - e_{y_i}‖₂``
    (Theorem 4.1; ``D ℓ_y[z] = p - e_y``).

    Shapes: ``W (c, d)``, ``X (n, d)``, ``y (n,)`` integer labels in ``[0, c)``.
    Returns a Python float in ``[0, sqrt(2))``.
    """
    Wt, Xt, yt = _check_model(W, X, y)
    with torch.no_grad():
        return float(_mu_per_example(_log_probs(Wt, Xt), yt).mean())


def nu(W, X, y) -> float:
    """ν(W) of Theorem 4.1: the mean trace of the loss Hessian in the logits.

    ``ν(W) = E_{P_n} tr(D² ℓ_y[W x]) = (1/n) Σ_i (1 - ‖softmax(W x_i)‖₂²)``
    (Theorem 4.1; ``D² ℓ_y[z] = diag(p) - ppᵀ``, independent of ``y``; ``y``
    is only validated).  Computed as ``Σ_j p_j (1 - p_j)`` with
    ``1 - p_max`` taken as the sum of the other probabilities, for full
    relative accuracy near saturation.

    Shapes: ``W (c, d)``, ``X (n, d)``, ``y (n,)``.  Returns a Python float in
    ``[0, 1 - 1/c]``.
    """
    Wt, Xt, _ = _check_model(W, X, y)
    with torch.no_grad():
        return float(_nu_per_example(_log_probs(Wt, Xt)).mean())


def norm_2_1(M):
    """The (2,1) norm: the sum of the Euclidean norms of the columns.

    ``‖M‖_{2,1} = Σ_j sqrt(Σ_i M_ij²)`` (docs/math.md, Theorem 4.1).  ``M`` has
    shape ``(r, k)``; returns a Python float.  Theorem 4.1 applies it to
    ``Wᵀ`` (see :func:`weight_norm`).
    """
    Mt = _to_float(M, "M", 2)
    with torch.no_grad():
        return float(torch.linalg.vector_norm(Mt, dim=0).sum())


def weight_norm(W) -> float:
    """``‖Wᵀ‖_{2,1} = Σ_{j=1..c} ‖W_{j,:}‖₂`` for ``W`` of shape ``(c, d)``.

    The norm that defines Theorem 4.1's class ``{W : ‖Wᵀ‖_{2,1} ≤ A}``: the
    sum over classes of the norms of the rows of ``W`` (the columns of
    ``Wᵀ``).  Returns a Python float.
    """
    Wt = _to_float(W, "W", 2)
    return norm_2_1(Wt.T)


def theta(X, c) -> float:
    """θ of Theorem 4.1: ``θ = log³(n c) · max_i ‖x_i‖₂²``.

    ``X`` has shape ``(n, d)``; ``c`` is the number of classes (an integer
    ≥ 1).  Returns a Python float.
    """
    Xt = _to_float(X, "X", 2)
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) < 1:
        raise DropcheckError(f"the number of classes c must be an integer ≥ 1, got {c!r}")
    n = Xt.shape[0]
    if n < 1:
        raise DropcheckError("X has no examples (rows)")
    with torch.no_grad():
        max_sq = float((Xt * Xt).sum(1).max())
    return math.log(n * int(c)) ** 3 * max_sq


def zeta(B, delta, n) -> float:
    """ζ of Theorem 4.1: ``ζ = B (log(1/δ) + log log n) / n``.

    ``B > 0`` the truncation level, ``δ ∈ (0, 1)`` the failure probability,
    ``n ≥ 3`` the training-sample size (so that ``log log n > 0``).
    Returns a Python float.
    """
    B = _check_B(B)
    delta = _check_delta(delta)
    n = _check_n(n)
    return B * (math.log(1.0 / delta) + math.log(math.log(n))) / n


def truncated_loss(W, X, y, B):
    """The truncated loss of Theorem 4.1 per example: ``ℓ̄_i = min(B, ℓ_{y_i}(W x_i))``.

    ``ℓ_y(z) = -log softmax(z)_y`` via a stable log-softmax.  Shapes:
    ``W (c, d)``, ``X (n, d)``, ``y (n,)``; returns shape ``(n,)`` float64
    (a torch tensor if any input is one, else a numpy array).
    """
    B = _check_B(B)
    Wt, Xt, yt = _check_model(W, X, y)
    with torch.no_grad():
        loss = -_log_probs(Wt, Xt).gather(1, yt[:, None])[:, 0]
        out = torch.clamp(loss, max=B)
    return _out(out, _is_torch(W, X, y))


# ---------------------------------------------------------------------------
# the terms of the right-hand side: one line each (docs/math.md: keep separate)
# ---------------------------------------------------------------------------


def term_mu(A: float, mu_: float, theta_: float, B: float, n: int) -> float:
    """First term of Theorem 4.1: ``(A μ)^{2/3} (θ B)^{1/3} / n^{1/3}``."""
    return (A * mu_) ** (2.0 / 3.0) * (theta_ * B) ** (1.0 / 3.0) / n ** (1.0 / 3.0)


def term_nu(A: float, nu_: float, theta_: float, B: float, n: int) -> float:
    """Second term of Theorem 4.1: ``sqrt(A² B ν θ / n)``."""
    return math.sqrt(A * A * B * nu_ * theta_ / n)


def term_third(A: float, nu_: float, theta_: float, B: float, n: int) -> float:
    """Third term of Theorem 4.1: ``B A² θ / (n (log²(B A² θ / (ν n)) + 1))``.

    Limits: 0 when ``B A² θ = 0``; 0 when ``ν = 0`` (the log² diverges)."""
    num = B * A * A * theta_
    return 0.0 if num == 0.0 else (0.0 if nu_ <= 0.0 else num / (n * (math.log(num / (nu_ * n)) ** 2 + 1.0)))


@dataclass(frozen=True)
class BoundTerms:
    """Every quantity of Theorem 4.1 evaluated at one ``W`` (all Python floats).

    ``rhs = constant · (term_mu + term_nu + term_third + zeta)``.
    ``train_truncated_loss = E_{P_n} ℓ̄``; when test data were given,
    ``test_truncated_loss = E_test ℓ̄`` and
    ``observed_gap = E_test ℓ̄ - 1.01 E_{P_n} ℓ̄`` (the left-hand side with the
    test sample standing in for ``P``), else both are ``None``.
    """

    n: int
    c: int
    d: int
    B: float
    delta: float
    constant: float
    A: float
    weight_norm: float
    mu: float
    nu: float
    theta: float
    term_mu: float
    term_nu: float
    term_third: float
    zeta: float
    rhs: float
    train_truncated_loss: float
    test_truncated_loss: Optional[float] = None
    observed_gap: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def theorem_4_1(
    W,
    X,
    y,
    *,
    B,
    delta,
    A=None,
    constant: float = 1.0,
    X_test=None,
    y_test=None,
) -> BoundTerms:
    """Evaluate Theorem 4.1 (linear models) at ``W`` on the training sample ``(X, y)``.

    ``E_P[ℓ̄] - 1.01 E_{P_n}[ℓ̄] ≲ term_mu + term_nu + term_third + ζ``
    for all ``W`` with ``‖Wᵀ‖_{2,1} ≤ A`` (the module docstring gives each
    term).  ``rhs = constant · (sum of the four terms)``.

    Shapes: ``W (c, d)``, ``X (n, d)`` with ``n ≥ 3``, ``y (n,)``;
    ``X_test (m, d)``, ``y_test (m,)`` optional (both or neither).
    ``A`` defaults to ``‖Wᵀ‖_{2,1}``; an ``A`` below ``‖Wᵀ‖_{2,1}`` (beyond a
    relative rounding tolerance of 1e-9) raises :class:`DropcheckError`,
    because ``W`` is then outside the theorem's class.  ``B > 0``,
    ``δ ∈ (0, 1)``, ``constant > 0``.
    """
    Bf = _check_B(B)
    deltaf = _check_delta(delta)
    const = _positive(constant, "the constant")
    Wt, Xt, yt = _check_model(W, X, y)
    c, d = Wt.shape
    n = _check_n(Xt.shape[0])
    wn = weight_norm(Wt)
    if A is None:
        Af = wn
    else:
        try:
            Af = float(A)
        except (TypeError, ValueError) as exc:
            raise DropcheckError(f"A must be a number, got {A!r}") from exc
        if not math.isfinite(Af) or Af < 0:
            raise DropcheckError(f"A must be a finite number ≥ 0, got {A!r}")
        if Af < wn * (1.0 - 1e-9):
            raise DropcheckError(
                f"A = {Af:.6g} is smaller than ‖Wᵀ‖_{{2,1}} = {wn:.6g}: Theorem 4.1 holds only "
                f"for W in the class ‖Wᵀ‖_{{2,1}} ≤ A"
            )
    if (X_test is None) != (y_test is None):
        raise DropcheckError("give both X_test and y_test, or neither")

    with torch.no_grad():
        logp = _log_probs(Wt, Xt)
        mu_ = float(_mu_per_example(logp, yt).mean())
        nu_ = float(_nu_per_example(logp).mean())
        train_tl = float(torch.clamp(-logp.gather(1, yt[:, None])[:, 0], max=Bf).mean())
    th = theta(Xt, c)
    t1 = term_mu(Af, mu_, th, Bf, n)
    t2 = term_nu(Af, nu_, th, Bf, n)
    t3 = term_third(Af, nu_, th, Bf, n)
    z = zeta(Bf, deltaf, n)
    rhs = const * (t1 + t2 + t3 + z)

    test_tl = gap = None
    if X_test is not None:
        Xs = _to_float(X_test, "X_test", 2)
        if Xs.shape[1] != d:
            raise DropcheckError(f"X_test has {Xs.shape[1]} features (columns) but W and X have {d}")
        if Xs.shape[0] < 1:
            raise DropcheckError("X_test has no examples (rows)")
        try:
            ys = _to_labels(y_test, Xs.shape[0], c)
        except DropcheckError as exc:
            raise DropcheckError(f"y_test: {exc}") from None
        with torch.no_grad():
            test_tl = float(torch.clamp(-_log_probs(Wt, Xs).gather(1, ys[:, None])[:, 0], max=Bf).mean())
        gap = test_tl - 1.01 * train_tl

    return BoundTerms(
        n=n, c=int(c), d=int(d), B=Bf, delta=deltaf, constant=const, A=Af,
        weight_norm=wn, mu=mu_, nu=nu_, theta=th, term_mu=t1, term_nu=t2,
        term_third=t3, zeta=z, rhs=rhs, train_truncated_loss=train_tl,
        test_truncated_loss=test_tl, observed_gap=gap,
    )
