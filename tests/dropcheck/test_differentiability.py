"""``explicit_regularizer(...).backward()`` gives the gradient of the value.

- exact: the autograd gradient equals a central finite difference of the
  exact value along a random parameter direction (float64, step 1e-5:
  truncation ~1e-10, rounding ~1e-11 relative);
- hutchinson / fd with a fixed generator seed (the same probe): the gradient
  is the derivative of that probe's value, fd's gradient equals hutchinson's
  to O(ε²), and averaged over probes it is the exact value's gradient
  (z-test of ⟨∇, d⟩, |z| < 4.5: 6.8e-6 for a Gaussian statistic);
- taylor_regularizer likewise (it can be differentiated too).
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import example, given

import dropcheck as dc




import dc_cases as cases
import dc_references as refs
import dc_stats as stats
import dc_strategies as strategies
STEP = 1e-5
FD_TOL = 1e-6


def param_direction(model, seed):
    g = cases.gen(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def backward_dot(fn, model, d):
    model.zero_grad(set_to_none=True)
    fn().backward()
    return sum(float((p.grad * v).sum()) for p, v in zip(model.parameters(), d) if p.grad is not None)


def central_difference(fn, model, d, step=STEP):
    vals = []
    with torch.no_grad():
        for s in (step, -step):
            for p, v in zip(model.parameters(), d):
                p.add_(s * v)
            vals.append(float(fn().detach()))
            for p, v in zip(model.parameters(), d):
                p.sub_(s * v)
    return (vals[0] - vals[1]) / (2 * step)


def check_grad(fn, model, seed=0):
    d = param_direction(model, seed)
    return stats.rel(backward_dot(fn, model, d), central_difference(fn, model, d))


@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS)))
@example(cases.TINY_Q)
@example(cases.LAST_ONLY | dict(acts=["sigmoid", "tanh"]))
def test_exact_gradient_is_derivative_of_value(case):
    model, X, y = cases.build(case)
    err = check_grad(lambda: dc.explicit_regularizer(model, X, y), model, case["seed"] % 1000)
    assert err < FD_TOL, err


def dense_value(model, X, y):
    return torch.tensor(sum(refs.bf_explicit(model, X, y).values()), dtype=torch.float64)


@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS), max_hidden=1))
@example(cases.TINY_Q)
def test_exact_gradient_is_gradient_of_dense_value(case):
    """∇ of explicit_regularizer (autograd) vs a central difference of the
    independent dense-route value: the gradient is that of the right quantity
    (catches a wrong λ or H_out that the self-consistency check above cannot)."""
    model, X, y = cases.build(case)
    d = param_direction(model, case["seed"] % 1000 + 1)
    an = backward_dot(lambda: dc.explicit_regularizer(model, X, y), model, d)
    assert stats.rel(an, central_difference(lambda: dense_value(model, X, y), model, d)) < FD_TOL


@pytest.mark.parametrize("estimator", ["hutchinson", "fd", "exact"])
@pytest.mark.parametrize("which", ["mlp", "locked_rnn", "dropconnect"])
def test_gradient_is_derivative_of_the_same_probe_value(estimator, which):
    """For fd, ε = 1e-3 here: at the default ε = 6e-6 the value carries rounding
    noise ~u/ε ≈ 2e-11 that a parameter finite difference would amplify."""
    model, X, y = model_case(which)
    eps = 1e-3 if estimator == "fd" else None
    fn = lambda: dc.explicit_regularizer(model, X, y, estimator=estimator, generator=7, samples=2, eps=eps)  # noqa: E731
    assert check_grad(fn, model, 1) < FD_TOL


def model_case(which):
    if which == "mlp":
        return cases.build(dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=1.5, n=3, seed=4))
    if which == "locked_rnn":
        m = cases.ElmanLocked(seed=3)
        return (m, *cases.seq_data(3, 2, 2, 3, seed=3))
    m = cases.WeightDropRNN(seed=4)
    return (m, *cases.seq_data(3, 2, 2, 3, seed=4))


@pytest.mark.parametrize("which", ["mlp", "locked_rnn", "dropconnect"])
def test_fd_gradient_equals_hutchinson_gradient_same_probe(which):
    """Per site (fd probes one site at a time with ``per_site=True``), the same
    seed gives the same probe; the gradients agree to O(ε²) + rounding/ε."""
    model, X, y = model_case(which)
    d = param_direction(model, 2)
    keys = list(dc.explicit_regularizer(model, X, y, per_site=True))
    for seed in range(2):
        for key in keys:
            gh = backward_dot(
                lambda: dc.explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed, per_site=True)[key],
                model, d,
            )
            gf = backward_dot(
                lambda: dc.explicit_regularizer(model, X, y, estimator="fd", generator=seed, per_site=True)[key],
                model, d,
            )
            assert stats.rel(gf, gh) < 1e-5, (key, gf, gh)


@pytest.mark.parametrize("estimator", ["hutchinson", "fd"])
def test_stochastic_gradient_unbiased_light(estimator):
    """⟨∇R_est, d⟩ over 100 probe sets (4 probes each) averages to ⟨∇R_exact, d⟩."""
    model, X, y = model_case("mlp")
    d = param_direction(model, 3)
    target = backward_dot(lambda: dc.explicit_regularizer(model, X, y), model, d)
    g = cases.gen(21)
    vals = [
        backward_dot(lambda: dc.explicit_regularizer(model, X, y, estimator=estimator, samples=4, generator=g), model, d)
        for _ in range(100)
    ]
    z = stats.zscore(vals, target)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.heavy
@pytest.mark.parametrize("estimator", ["hutchinson", "fd"])
@pytest.mark.parametrize("which", ["mlp", "locked_rnn", "dropconnect"])
def test_stochastic_gradient_unbiased_heavy(estimator, which):
    model, X, y = model_case(which)
    d = param_direction(model, 3)
    target = backward_dot(lambda: dc.explicit_regularizer(model, X, y), model, d)
    g = cases.gen(22)
    vals = [
        backward_dot(lambda: dc.explicit_regularizer(model, X, y, estimator=estimator, samples=4, generator=g), model, d)
        for _ in range(1000)
    ]
    z = stats.zscore(vals, target)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.parametrize("which", ["mlp", "locked_rnn", "dropconnect"])
def test_taylor_gradient_is_derivative_of_value(which):
    model, X, y = model_case(which)
    assert check_grad(lambda: dc.taylor_regularizer(model, X, y), model, 5) < FD_TOL


def test_regularizer_adds_to_a_loss_and_trains():
    """Algorithm-2 style use: loss + R_approx, one SGD step lowers R_approx
    for a small step (the gradient is a descent direction)."""
    model, X, y = model_case("mlp")
    r0 = float(dc.explicit_regularizer(model, X, y).detach())
    model.zero_grad()
    dc.explicit_regularizer(model, X, y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1e-3 * p.grad)
    assert float(dc.explicit_regularizer(model, X, y).detach()) < r0
