"""Linear softmax problems for the Theorem 4.1 and linear-dropout tests:
Hypothesis strategies and autograd references (shared by
``tests/dropcheck/test_bound.py``, ``test_linear.py`` and
``tests/training/test_bound_runs.py``)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

F64 = torch.float64


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
