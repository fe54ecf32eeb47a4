"""Bad input raises one clear ``dc.DropcheckError`` naming the problem."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dropcheck as dc




import dc_cases as cases  # noqa: E402  (tests/dropcheck is on pytest's pythonpath)

# every public entry point that takes (model, inputs, targets)
API = {
    "explicit_exact": lambda m, X, y: dc.explicit_regularizer(m, X, y),
    "explicit_sampled": lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="sampled", generator=0),
    "explicit_hutchinson": lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="hutchinson", generator=0),
    "explicit_fd": lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="fd", generator=0),
    "loss_jacobian": lambda m, X, y: dc.loss_jacobian_regularizer(m, X, y),
    "taylor": lambda m, X, y: dc.taylor_regularizer(m, X, y),
    "gap_mc": lambda m, X, y: dc.dropout_gap(m, X, y, samples=4, generator=0),
    "gap_exact": lambda m, X, y: dc.dropout_gap(m, X, y, exact=True),
    "first_order_gap": lambda m, X, y: dc.first_order_gap(m, X, y),
    "implicit_noise": lambda m, X, y: dc.implicit_noise(m, X, y, generator=0),
    "implicit_noise_fd": lambda m, X, y: dc.implicit_noise(m, X, y, generator=0, estimator="fd"),
    "implicit_noise_covariance": lambda m, X, y: dc.implicit_noise_covariance(m, X, y),
    "dropout_gradient": lambda m, X, y: dc.dropout_gradient(m, X, y, generator=0),
    "dropout_k_gradient": lambda m, X, y: dc.dropout_k_gradient(m, X, y, 2, generator=0),
    "two_draw_noise": lambda m, X, y: dc.two_draw_noise(m, X, y, generator=0),
    "noise_injected": lambda m, X, y: dc.noise_injected_dropout_k_gradient(m, X, y, 2, generator=0),
}


def good():
    model = cases.mlp([3, 2, 3], ["tanh"], {0: 0.3}, seed=0)
    X, y = cases.data(2, 3, 3, seed=0)
    return model, X, y


@pytest.mark.parametrize("fn", list(API))
def test_good_input_runs(fn):
    API[fn](*good())


@pytest.mark.parametrize("fn", list(API))
def test_no_dropout_site(fn):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Dropout(0.0), nn.Linear(3, 3)).double()
    _, X, y = good()
    with pytest.raises(dc.NoDropoutSiteError, match="no dropout site"):
        API[fn](model, X, y)


@pytest.mark.parametrize("fn", list(API))
@pytest.mark.parametrize("p", [1.0, 1.5, float("nan"), -0.2])
def test_dropout_probability_outside_unit_interval(fn, p):
    model, X, y = good()
    model[0].p = p  # nn.Dropout itself accepts p = 1.0
    with pytest.raises(dc.DropcheckError, match=r"q must lie in \[0, 1\)"):
        API[fn](model, X, y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dc.LockedDropout(-0.1),
        lambda: dc.LockedDropout(1.0),
        lambda: dc.DropConnect(1.5),
        lambda: dc.GaussianDropout(float("nan")),
        lambda: dc.WeightDrop(nn.Linear(2, 2), ["weight"], 1.0),
    ],
)
def test_site_constructor_rejects_q(make):
    with pytest.raises(dc.DropcheckError, match=r"q must lie in \[0, 1\)"):
        make()


@pytest.mark.parametrize("fn", list(API))
@pytest.mark.parametrize(
    "bad_y, match",
    [
        (lambda y: y[:1], "do not match targets"),
        (lambda y: y[:, None], "do not match targets"),
        (lambda y: y.double(), "integer class indices"),
        (lambda y: y + 10, r"targets must lie in \[0, 3\)"),
    ],
)
def test_logits_targets_mismatch(fn, bad_y, match):
    model, X, y = good()
    with pytest.raises(dc.DropcheckError, match=match):
        API[fn](model, X, bad_y(y))


@pytest.mark.parametrize("fn", list(API))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(fn, bad):
    model, X, y = good()
    X = X.clone()
    X[0, 1] = bad
    with pytest.raises(dc.DropcheckError, match="non-finite"):
        API[fn](model, X, y)


@pytest.mark.parametrize("fn", ["explicit_exact", "taylor", "gap_mc", "implicit_noise", "dropout_gradient"])
def test_non_finite_parameters(fn):
    model, X, y = good()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(dc.DropcheckError, match="non-finite"):
        API[fn](model, X, y)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="jacobian"), "unknown estimator 'jacobian'"),
        (lambda m, X, y: dc.taylor_regularizer(m, X, y, estimator="fd"), "unknown estimator 'fd'"),
        (lambda m, X, y: dc.implicit_noise(m, X, y, estimator="exact"), "unknown estimator 'exact'"),
        (lambda m, X, y: dc.explicit_regularizer(m, X, y, hessian="gauss"), "unknown hessian 'gauss'"),
        (lambda m, X, y: dc.implicit_noise(m, X, y, noise="uniform"), "unknown noise 'uniform'"),
        (lambda m, X, y: dc.dropout_gap(m, X, y, noise="rademacher"), "unknown noise 'rademacher'"),
        (lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="sampled", samples=0), "samples must be >= 1"),
        (lambda m, X, y: dc.explicit_regularizer(m, X, y, estimator="fd", eps=0.0), "eps must be > 0"),
        (lambda m, X, y: dc.dropout_gap(m, X, y, samples=1), "samples >= 2"),
        (lambda m, X, y: dc.dropout_gap(m, X, y, antithetic=True), "symmetric"),
        (lambda m, X, y: dc.dropout_k_gradient(m, X, y, 0), "k must be a positive integer"),
        (lambda m, X, y: dc.implicit_noise(m, X, y, params=["nope"]), "nope"),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(dc.DropcheckError, match=match):
        call(*good())


@pytest.mark.parametrize("alpha", [nn.AlphaDropout, nn.FeatureAlphaDropout])
@pytest.mark.parametrize("fn", ["explicit_exact", "taylor", "gap_mc", "implicit_noise"])
def test_alpha_dropout_rejected(alpha, fn):
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 3), alpha(0.1), nn.Linear(3, 3)).double()
    _, X, y = good()
    with pytest.raises(dc.DropcheckError, match=alpha.__name__):
        API[fn](model, X, y)


def test_exact_enumeration_with_too_many_units():
    """``max_units`` bounds the largest group of dependent units: per-example
    dropout on 2 examples is two groups of 5 + 4 = 9 units, not one of 18."""
    model = cases.mlp([5, 4, 3], ["tanh"], {0: 0.3, 1: 0.2}, seed=1)
    X, y = cases.data(2, 5, 3, seed=1)  # 2·(5 + 4) = 18 units
    assert dc.dropout_gap(model, X, y, exact=True, max_units=9).samples == 2 * 2**9
    with pytest.raises(dc.DropcheckError, match=r"group of at least \d+ dependent noise units.*max_units=8"):
        dc.dropout_gap(model, X, y, exact=True, max_units=8)
    with pytest.raises(dc.DropcheckError, match="max_units=4"):
        dc.dropout_gap(model, X[:1], y[:1], exact=True, max_units=4)


def test_exact_enumeration_rejects_gaussian_noise():
    model = cases.mlp([3, 2, 3], ["tanh"], {1: 0.3}, seed=0, site_cls=dc.GaussianDropout)
    _, X, y = good()
    with pytest.raises(dc.DropcheckError, match="Bernoulli"):
        dc.dropout_gap(model, X, y, exact=True)


def test_weightdrop_unknown_weight():
    with pytest.raises(dc.DropcheckError, match="no parameter"):
        dc.WeightDrop(nn.Linear(2, 2), ["weight_hh"], 0.3)


def test_locked_dropout_needs_time_axis():
    model = nn.Sequential(dc.LockedDropout(0.3), nn.Linear(3, 3)).double()
    _, X, y = good()
    with pytest.raises(dc.DropcheckError, match="at least 2 dims"):
        dc.explicit_regularizer(model, X[0], y[0])


def test_errors_are_value_errors():
    assert issubclass(dc.DropcheckError, ValueError)
    assert issubclass(dc.NoDropoutSiteError, dc.DropcheckError)
