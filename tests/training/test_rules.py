"""Each update rule's gradient equals its definition, computed independently
with dropcheck's functions (same generator, same draw order), and each rule
lowers the training loss."""

from __future__ import annotations

import math

import pytest
import torch

import dropcheck as dc
from dropcheck import DropcheckError
from training.pipeline.configs import RULES, make_config, run_name
from training.pipeline.rules import REGISTRY, lam, make_rule, needs_double_backward, rule_class

from rule_fixtures import Q, V, X, Y, _clean_loss, _gens, _grad, _setup, _train_briefly  # noqa: F401


def _site_modules(model):
    """The model's dropout modules by name (to change a q before a rule is built)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (dc.LockedDropout, dc.DropConnect))}

def _named(model):
    return [(n, p) for n, p in model.named_parameters()]


def _close(a, b, tol=1e-11):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


def _add(*ds, coefs=None):
    coefs = coefs or [1.0] * len(ds)
    return {n: sum(c * d[n] for c, d in zip(coefs, ds)) for n in ds[0]}


def test_none_is_the_clean_gradient():
    cfg, model, rule = _setup("none")
    g, res = rule.gradient(model, X, Y, _gens())
    _close(g, _grad(model, _clean_loss(model)))
    # the sites' own (global-RNG) dropout is not involved: same result twice
    g2, _ = rule.gradient(model, X, Y, _gens(99))
    _close(g, g2, 0)


def test_l2_adds_weight_decay_of_the_coefficient():
    cfg, model, rule = _setup("l2", l2=0.01)
    g, res = rule.gradient(model, X, Y, _gens())
    ref = _grad(model, _clean_loss(model))
    _close(g, {n: ref[n] + 0.01 * p.detach() for n, p in _named(model)})


@pytest.mark.parametrize("k", [1, 3])
def test_dropout_k_is_the_mean_of_k_single_mask_gradients(k):
    cfg, model, rule = _setup("dropout", k=k)
    g, res = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    singles = [dc.dropout_gradient(model, X, Y, generator=gen) for _ in range(k)]
    _close(g, _add(*singles, coefs=[1.0 / k] * k))
    _close(g, dc.dropout_k_gradient(model, X, Y, k, generator=torch.Generator().manual_seed(5)))
    # k draws really differ (else DROPOUT_k would be DROPOUT_1)
    if k > 1:
        assert any((singles[0][n] - singles[1][n]).abs().max() > 1e-6 for n in singles[0])


def test_dropout_inject_adds_scaled_two_draw_noise():
    k = 4
    cfg, model, rule = _setup("dropout_inject", k=k)
    g, res = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    gk = dc.dropout_k_gradient(model, X, Y, k, generator=gen)
    g1 = dc.dropout_gradient(model, X, Y, generator=gen)
    g2 = dc.dropout_gradient(model, X, Y, generator=gen)
    c = math.sqrt((1 - 1 / k) / 2)
    assert c == pytest.approx(math.sqrt(3 / 8))
    _close(g, _add(gk, g1, g2, coefs=[1.0, c, -c]))
    _close(g, dc.noise_injected_dropout_k_gradient(model, X, Y, k, generator=torch.Generator().manual_seed(5)))
    # k = 1: no noise at all (the scale is 0)
    cfg, model, rule = _setup("dropout_inject", k=1)
    assert rule.noise(model, X, Y, _gens()) is None


@pytest.mark.parametrize("estimator", ["exact", "sampled", "hutchinson", "fd"])
def test_explicit_is_clean_loss_plus_lambda_weighted_r_approx(estimator):
    cfg, model, rule = _setup("explicit", estimator=estimator)
    g, res = rule.gradient(model, X, Y, _gens())
    R = dc.explicit_regularizer(model, X, Y, estimator=estimator, generator=torch.Generator().manual_seed(5))
    tol = 1e-11 if estimator != "fd" else 1e-7
    _close(g, _grad(model, _clean_loss(model) + R), tol)
    assert float(res.reg["R"]) == pytest.approx(float(R.detach()), rel=tol)
    assert float(res.loss) == pytest.approx(_clean_loss(model).item(), rel=1e-12)


def test_explicit_per_group_coefficients():
    mult = dict(explicit_mult=2.0, explicit_mult_hidden=3.0, explicit_mult_weights=0.5, explicit_mult_rows=0.0)
    cfg, model, rule = _setup("explicit", estimator="exact", **mult)
    g, res = rule.gradient(model, X, Y, _gens())
    per = dc.explicit_regularizer(model, X, Y, estimator="exact", weighted=False, per_site=True)
    group = {"lm.drop_emb": ("embedding", 0.3), "lm.drop_hidden.0": ("hidden", 0.2), "lm.drop_out": ("output", 0.4),
             "lm.rnns.0.wdrop": ("weights", 0.25), "lm.rnns.1.wdrop": ("weights", 0.25), "lm.drop_rows": ("rows", 0.1)}
    assert set(per) == set(group)
    gm = {"embedding": 1.0, "hidden": 3.0, "output": 1.0, "weights": 0.5, "rows": 0.0}
    R = sum(2.0 * gm[group[k][0]] * group[k][1] / (2 * (1 - group[k][1])) * v for k, v in per.items())
    _close(g, _grad(model, _clean_loss(model) + R))
    assert float(res.reg["R/hidden"]) == pytest.approx(2 * 3 * lam(0.2) * per["lm.drop_hidden.0"].item())
    assert float(res.reg["R/rows"]) == 0.0
    assert lam(0.4) == pytest.approx(1 / 3)


def test_fd_estimator_with_group_coefficients_uses_lambda_of_q_prime():
    """fd probes all sites at once with weights λ(q); a group coefficient c
    is realised by q' with λ(q') = c.  With one active site the value is
    exactly c/λ(q) times the default one (same probes)."""
    only_hidden = dict(q_embedding=0.0, q_output=0.0, q_weights=0.0, q_rows=0.0)
    cfg, model, rule = _setup("explicit", estimator="fd", explicit_mult_hidden=2.5, **only_hidden)
    mods = _site_modules(model)
    for n, m in mods.items():
        m.p = {"lm.drop_hidden.0": 0.2}.get(n, 0.0)
    rule = make_rule(cfg, model)  # the rule reads q from the core's sites when it is built
    R, reg = rule.explicit_term(model, X, Y, _gens())
    R0 = dc.explicit_regularizer(model, X, Y, estimator="fd", generator=torch.Generator().manual_seed(5))
    assert R.item() == pytest.approx(2.5 * R0.item(), rel=1e-6)
    assert mods["lm.drop_hidden.0"].p == 0.2  # restored


def test_dropout_implicit_is_dropout_k_plus_sqrt_one_minus_one_over_k_xi():
    k = 4
    cfg, model, rule = _setup("dropout_implicit", k=k)
    g, res = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    gk = dc.dropout_k_gradient(model, X, Y, k, generator=gen)
    xi = dc.implicit_noise(model, X, Y, generator=gen)
    _close(g, _add(gk, xi, coefs=[1.0, math.sqrt(1 - 1 / k)]))


@pytest.mark.parametrize("noise_estimator", ["autograd", "fd"])
def test_explicit_implicit_is_algorithm_2(noise_estimator):
    cfg, model, rule = _setup("explicit_implicit", estimator="sampled", noise_estimator=noise_estimator, implicit_mult=1.5)
    g, res = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    R = dc.explicit_regularizer(model, X, Y, estimator="sampled", generator=gen)
    xi = dc.implicit_noise(model, X, Y, estimator=noise_estimator, generator=gen)
    tol = 1e-11 if noise_estimator == "autograd" else 1e-7
    _close(g, _add(_grad(model, _clean_loss(model) + R), xi, coefs=[1.0, 1.5]), tol)


def test_implicit_group_multipliers_scale_each_groups_eta():
    """ξ_approx is linear in η: multiplier 2 on the embedding group equals
    ξ(all) + ξ(embedding site alone), with the same Rademacher signs
    (the embedding site is the first whose η is drawn once rows are off)."""
    base = dict(q_rows=0.0)
    cfg, model, rule = _setup("explicit_implicit", implicit_mult_embedding=2.0, **base)
    mods = _site_modules(model)
    mods["lm.drop_rows"].p = 0.0
    rule = make_rule(cfg, model)
    xi = rule.implicit_noise(model, X, Y, _gens(), 1.0)
    full = dc.implicit_noise(model, X, Y, generator=torch.Generator().manual_seed(5))
    saved = {n: m.p for n, m in mods.items()}
    for n, m in mods.items():
        if n != "lm.drop_emb":
            m.p = 0.0
    emb_only = dc.implicit_noise(model, X, Y, generator=torch.Generator().manual_seed(5))
    for n, m in mods.items():
        m.p = saved[n]
    _close(xi, _add(full, emb_only), 1e-10)
    # a multiplier of 0 removes the group
    cfg, model, rule = _setup("explicit_implicit", implicit_mult_embedding=0.0, **base)
    mods = _site_modules(model)
    mods["lm.drop_rows"].p = 0.0
    rule = make_rule(cfg, model)
    xi0 = rule.implicit_noise(model, X, Y, _gens(), 1.0)
    mods["lm.drop_emb"].p = 0.0
    ref = dc.implicit_noise(model, X, Y, generator=torch.Generator().manual_seed(5))
    _close(xi0, ref, 1e-10)


def test_identity_hessian_and_loss_jacobian_ablations():
    cfg, model, rule = _setup("identity_hessian", estimator="exact", explicit_mult=4.0)
    g, _ = rule.gradient(model, X, Y, _gens())
    R = dc.explicit_regularizer(model, X, Y, estimator="exact", hessian="identity")
    _close(g, _grad(model, _clean_loss(model) + 4.0 * R))

    cfg, model, rule = _setup("loss_jacobian", explicit_mult=2.0)
    g, _ = rule.gradient(model, X, Y, _gens())
    R = dc.loss_jacobian_regularizer(model, X, Y)
    _close(g, _grad(model, _clean_loss(model) + 2.0 * R))

    cfg, model, rule = _setup("loss_jacobian", ablation_noise=True)
    g, _ = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    R = dc.loss_jacobian_regularizer(model, X, Y)
    xi = dc.implicit_noise(model, X, Y, generator=gen)
    _close(g, _add(_grad(model, _clean_loss(model) + R), xi))


@pytest.mark.parametrize("rule_name", RULES)
def test_every_rule_lowers_the_training_loss(rule_name):
    over = {"k": 2} if rule_name.startswith("dropout") else {}
    cfg, model, rule = _setup(rule_name, backend="fused", **over)
    before, after = _train_briefly(model, rule)
    assert after < before - 0.05, (before, after)


def test_rules_need_an_active_site():
    with pytest.raises(DropcheckError, match="needs at least one dropout site with q > 0"):
        _setup("explicit", q_embedding=0.0, q_hidden=0.0, q_output=0.0, q_weights=0.0, q_rows=0.0)


def test_double_backward_requirement():
    base = make_config("smoke")
    need = lambda **o: needs_double_backward({**base, **o})  # noqa: E731
    assert not need(rule="dropout", k=8)
    assert not need(rule="dropout_inject", k=8)
    assert need(rule="dropout_implicit", k=2) and not need(rule="dropout_implicit", k=2, noise_estimator="fd")
    assert not need(rule="dropout_implicit", k=1)
    assert need(rule="explicit") and not need(rule="explicit", estimator="fd")
    assert not need(rule="explicit_implicit", estimator="fd", noise_estimator="fd")
    assert need(rule="loss_jacobian", estimator="fd")
    assert need(rule="identity_hessian") and not need(rule="identity_hessian", estimator="fd")
    assert need(rule="identity_hessian", estimator="fd", ablation_noise=True)  # autograd ξ_approx
    assert not need(rule="identity_hessian", estimator="fd", ablation_noise=True, noise_estimator="fd")
    for est in ("fd_shared", "fd_mid"):  # the shared probe ignores noise_estimator
        assert not need(rule="explicit_implicit", estimator=est, noise_estimator="autograd")
        assert not rule_class("explicit_implicit").uses_noise_estimator({**base, "estimator": est})


def test_registry_describes_every_rule():
    """One class per config value: its name, a label for the figures (from a
    log header's partial config too), run names with -k<k> exactly for the
    rules that take k draws, and make_rule builds that class."""
    assert RULES == tuple(REGISTRY)
    labels = set()
    for name, cls in REGISTRY.items():
        assert cls.name == name
        labels.add(cls.label({"rule": name}))
        cfg = make_config("smoke", rule=name, k=3)
        assert run_name("smoke", cfg).endswith(f"{name}-k3-s{cfg['seed']}" if cls.takes_k else f"{name}-s{cfg['seed']}")
    assert len(labels) == len(REGISTRY)
    cfg, model, rule = _setup("dropout_implicit", k=2)
    assert type(rule) is REGISTRY["dropout_implicit"] and type(make_rule(cfg, model)) is type(rule)
    with pytest.raises(DropcheckError, match="expected one of"):
        rule_class("dropconnect")


def test_shared_probe_estimators_only_for_the_rules_that_have_them():
    fast = [n for n, c in REGISTRY.items() if c.shared_probe_ok]
    assert fast == ["explicit", "dropout_implicit", "explicit_implicit", "identity_hessian"]
    with pytest.raises(DropcheckError, match="fast path of rules 'explicit', .*'identity_hessian' only"):
        _setup("loss_jacobian", estimator="fd_shared")
