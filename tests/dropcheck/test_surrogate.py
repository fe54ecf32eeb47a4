"""analytic_dropout_objective: its gradient is Algorithm 2's update, built
from the independently tested fd estimators with the same probe."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import dropcheck as dc
from dropcheck._cases import CASES


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("case", ["mlp-tanh", "locked-rnn", "dropconnect"])
@given(seed=st.integers(0, 2**31 - 1), a=st.sampled_from([0.0, 1.0, 2.0]), b=st.sampled_from([0.0, 1.0, 0.5]),
       indep=st.booleans())
def test_gradient_is_explicit_plus_implicit(case, seed, a, b, indep):
    c = CASES[case]()
    model, X, y = c.model, c.inputs, c.targets
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    eps = 1e-4
    obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=a, implicit_weight=b, generator=seed, eps=eps,
                                        independent_positions=indep)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj.objective, params, allow_unused=True,
                                                                 materialize_grads=True, retain_graph=True)])
    # route B: the same probe v through the separately tested estimators
    R = dc.explicit_regularizer(model, X, y, estimator="fd", generator=seed, eps=eps, independent_positions=indep)
    if a or b:  # with both terms off no probe pass runs
        assert float(R.detach()) == pytest.approx(float(obj.explicit.detach()), rel=1e-12, abs=1e-15)
    g_lr = torch.autograd.grad(obj.loss + a * R, params, allow_unused=True, materialize_grads=True)
    xi = dc.implicit_noise(model, X, y, estimator="fd", noise="rademacher", generator=seed, eps=eps / math.sqrt(2),
                           independent_positions=indep)
    want = torch.cat([g.reshape(-1) for g in g_lr]) + b * _flat({n: xi[n] for n in names})
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_implicit_probe_matches_autograd_noise_in_expectation_of_direction():
    # ξ̂ (fd) agrees with the double-backward ξ_approx for the same η up to O(ε²)
    c = CASES["mlp-softplus-deep"]()
    model, X, y = c.model, c.inputs, c.targets
    params = list(model.parameters())
    obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=0.0, implicit_weight=1.0, generator=3, eps=1e-5)
    g = torch.autograd.grad(obj.objective - obj.loss, params)
    xi = dc.implicit_noise(model, X, y, estimator="autograd", generator=3)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in g]), _flat(xi), rtol=1e-6, atol=1e-9)


def test_bad_eps():
    c = CASES["mlp-tanh"]()
    with pytest.raises(dc.DropcheckError, match="eps"):
        dc.analytic_dropout_objective(c.model, c.inputs, c.targets, eps=0.0)


@pytest.mark.parametrize("est", ["exact", "sampled", "hutchinson", "fd"])
def test_site_weights_scale_each_site(est):
    c = CASES["mlp-tanh"]()
    model, X, y = c.model, c.inputs, c.targets
    base = dc.explicit_regularizer(model, X, y, estimator=est, generator=5, per_site=True)
    w = {"0": 0.5, "3": 3.0}
    got = dc.explicit_regularizer(model, X, y, estimator=est, generator=5, per_site=True, site_weights=w)
    for k in base:
        # fd per site probes with sqrt(λw) v: same probe, rescaled, so equal up to O(ε²)
        assert float(got[k].detach()) == pytest.approx(w[k] * float(base[k].detach()), rel=1e-5 if est == "fd" else 1e-12)
    with pytest.raises(dc.DropcheckError, match="unknown site"):
        dc.explicit_regularizer(model, X, y, site_weights={"nope": 1.0})
    with pytest.raises(dc.DropcheckError, match=">= 0"):
        dc.explicit_regularizer(model, X, y, site_weights={"0": -1.0})


def test_implicit_noise_site_weights_are_linear():
    c = CASES["mlp-tanh"]()
    model, X, y = c.model, c.inputs, c.targets
    a = dc.implicit_noise(model, X, y, generator=9, site_weights={"0": 0.0})
    b = dc.implicit_noise(model, X, y, generator=9, site_weights={"3": 0.0})
    full = dc.implicit_noise(model, X, y, generator=9)
    assert torch.allclose(_flat(a) + _flat(b), _flat(full), rtol=1e-10, atol=1e-12)


def test_value_checks_can_be_switched_off_and_shape_checks_stay():
    c = CASES["mlp-tanh"]()
    model, X, y = c.model, c.inputs, c.targets
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(dc.DropcheckError, match="non-finite"):
        dc.explicit_regularizer(model, bad, y)
    with dc.value_checks(False):
        r = dc.explicit_regularizer(model, X, y)  # same value without the checks
        with pytest.raises(dc.DropcheckError, match="do not match"):
            dc.explicit_regularizer(model, X, y[:1])
    assert float(r.detach()) == pytest.approx(float(dc.explicit_regularizer(model, X, y).detach()), rel=1e-15)
    with pytest.raises(dc.DropcheckError, match="non-finite"):  # restored after the block
        dc.explicit_regularizer(model, bad, y)
