"""The shared-probe fast path of Algorithm 2 (``rule=explicit_implicit
estimator=fd_shared``): its gradient is the separately computed
finite-difference explicit term plus finite-difference ξ_approx drawn from
the same probe, per-group coefficients included, and likewise for the
identity-Hessian ablation and for DROPOUT_k + ξ_approx (noise only); it trains; it refuses
multipliers that cannot share a probe and, under data parallelism, site
mixes whose noise would need two generators."""

from __future__ import annotations

import math

import pytest
import torch

import dropcheck as dc
from dropcheck._common import default_eps
from dropcheck import DropcheckError
from training.pipeline.configs import make_config
from training.pipeline.rules import Gens, needs_double_backward

from rule_fixtures import Q, V, X, Y, _clean_loss, _gens, _grad, _setup, _train_briefly  # noqa: F401


def _close(a, b, tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


def _add(*ds):
    return {n: sum(d[n] for d in ds) for n in ds[0]}

SITES = {
    "lm.drop_rows": "rows",
    "lm.drop_emb": "embedding",
    "lm.rnns.0.wdrop": "weights",
    "lm.drop_hidden.0": "hidden",
    "lm.rnns.1.wdrop": "weights",
    "lm.drop_out": "output",
}

COEFS = {
    "default": {},
    # (implicit)² / explicit = 2.25 for every group
    "per-group": dict(explicit_mult_hidden=4.0, implicit_mult=1.5, implicit_mult_hidden=2.0),
    # a global explicit multiplier: noise b = 1/sqrt(2) at probe scale sqrt(2λ)
    "explicit-mult": dict(explicit_mult=2.0, explicit_mult_weights=0.5, implicit_mult_weights=math.sqrt(0.5)),
    # a group switched off in both terms (its probe is drawn, scaled by 0)
    "group-off": dict(explicit_mult_rows=0.0, implicit_mult_rows=0.0, explicit_mult_output=9.0, implicit_mult_output=3.0),
}


def _weights(cfg, key):
    return {
        n: cfg[f"{key}_mult"] * cfg[f"{key}_mult_{g}"] for n, g in SITES.items()
    }


@pytest.mark.parametrize("case", list(COEFS))
def test_gradient_is_fd_explicit_plus_fd_implicit_with_the_same_probe(case):
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", **COEFS[case])
    assert rule.noise(model, X, Y, _gens()) is None  # the noise is in the objective
    g, res = rule.gradient(model, X, Y, _gens())

    e, m = _weights(cfg, "explicit"), _weights(cfg, "implicit")
    eps = default_eps(torch.float64)
    # the same Rademacher signs: a fresh generator with the same seed, same draw order
    R = dc.explicit_regularizer(model, X, Y, estimator="fd", eps=eps, site_weights=e,
                                generator=torch.Generator().manual_seed(5))
    # the objective's probes h(1 ± ε sqrt(λ w) v) are ξ_approx's h(1 ± ε' η) with
    # η = sqrt(2λ) m v and ε' = ε/√2
    xi = dc.implicit_noise(model, X, Y, estimator="fd", noise="rademacher", eps=eps / math.sqrt(2.0),
                           site_weights=m, generator=torch.Generator().manual_seed(5))
    _close(g, _add(_grad(model, _clean_loss(model) + R), xi), 1e-7)
    assert float(res.reg["R"]) == pytest.approx(float(R.detach()), rel=1e-9)
    assert float(res.loss) == pytest.approx(_clean_loss(model).item(), rel=1e-12)
    # the hidden state carried on is the clean pass's
    _, hid = rule.clean(model, X, Y)
    for (a, b), (c, d) in zip(res.hidden, hid):
        assert torch.equal(a, c) and torch.equal(b, d) and not a.requires_grad
    # the noise is really there: without it the gradient differs
    _close(rule.gradient(model, X, Y, _gens())[0], g, 0)  # deterministic given the seed
    cfg0, model0, rule0 = _setup("explicit_implicit", estimator="fd_shared", implicit_mult=0.0,
                                 **{k: v for k, v in COEFS[case].items() if not k.startswith("implicit")})
    g0, _ = rule0.gradient(model0, X, Y, _gens())
    assert any((g0[n] - g[n]).abs().max() > 1e-6 for n in g)


@pytest.mark.parametrize("case", list(COEFS))
def test_explicit_rule_gradient_is_the_fd_explicit_term(case):
    """``rule=explicit estimator=fd_shared``: ``∇(L + Σ_i c_i R̂_i)`` with the
    probe of ``estimator=fd`` (same seed, same draws), no noise; any implicit
    multipliers are ignored (the rule has none)."""
    cfg, model, rule = _setup("explicit", estimator="fd_shared", **COEFS[case])
    assert rule.shared_probe_weights()[:2] == (1.0, 0.0)
    assert rule.noise(model, X, Y, _gens()) is None
    g, res = rule.gradient(model, X, Y, _gens())
    e = _weights(cfg, "explicit")
    R = dc.explicit_regularizer(model, X, Y, estimator="fd", eps=default_eps(torch.float64), site_weights=e,
                                generator=torch.Generator().manual_seed(5))
    _close(g, _grad(model, _clean_loss(model) + R), 1e-9)
    assert float(res.reg["R"]) == pytest.approx(float(R.detach()), rel=1e-9)
    assert float(res.loss) == pytest.approx(_clean_loss(model).item(), rel=1e-12)
    _, hid = rule.clean(model, X, Y)
    for (a, b), (c, d) in zip(res.hidden, hid):
        assert torch.equal(a, c) and torch.equal(b, d)
    # equal in expectation to the fd route of the same rule: same probe law (mean over seeds not needed:
    # with every weight 1 the fd route draws the same probe from the same generator state)
    if case == "default":
        cfg2, model2, rule2 = _setup("explicit", estimator="fd")
        g2, res2 = rule2.gradient(model2, X, Y, _gens())
        _close(g, g2, 1e-9)
        assert float(res2.reg["R"]) == pytest.approx(float(res.reg["R"]), rel=1e-9)


@pytest.mark.parametrize("ablation_noise", [False, True])
def test_identity_hessian_rule_is_the_fd_identity_term(ablation_noise):
    """``rule=identity_hessian estimator=fd_shared``: ``∇(L + Σ_i c_i R̂_i)``
    with ``H_out → I/c`` and the probe of ``estimator=fd`` (same seed, same
    draws), plus, with ``ablation_noise``, ξ_approx from the same probe at
    noise weight ``m_i`` (``b = 1/sqrt(explicit_mult)``)."""
    over = dict(estimator="fd_shared", explicit_mult=6.0, ablation_noise=ablation_noise)
    cfg, model, rule = _setup("identity_hessian", **over)
    a, b, w = rule.shared_probe_weights()
    assert (a, b) == ((1.0, 1.0 / math.sqrt(6.0)) if ablation_noise else (1.0, 0.0))
    g, res = rule.gradient(model, X, Y, _gens())
    eps = default_eps(torch.float64)
    R = dc.explicit_regularizer(model, X, Y, estimator="fd", hessian="identity", eps=eps,
                                site_weights=_weights(cfg, "explicit"), generator=torch.Generator().manual_seed(5))
    ref = _grad(model, _clean_loss(model) + R)
    if ablation_noise:
        xi = dc.implicit_noise(model, X, Y, estimator="fd", noise="rademacher", eps=eps / math.sqrt(2.0),
                               site_weights=_weights(cfg, "implicit"), generator=torch.Generator().manual_seed(5))
        ref = _add(ref, xi)
    _close(g, ref, 1e-7 if ablation_noise else 1e-9)
    assert float(res.reg["R"]) == pytest.approx(float(R.detach()), rel=1e-9)
    R_out = dc.explicit_regularizer(model, X, Y, estimator="fd", eps=eps, site_weights=_weights(cfg, "explicit"),
                                    generator=torch.Generator().manual_seed(5))
    # H_out really is replaced: near-uniform softmax over 11 words brings H_out close to I/c (5% apart here),
    # still far beyond the 1e-9 agreement above
    assert abs(float(R_out.detach()) - float(R.detach())) > 1e-2 * abs(float(R.detach()))
    # the same update as the rule's fd route (same probe; the fd noise there is the autograd/fd estimator's)
    if not ablation_noise:
        cfg2, model2, rule2 = _setup("identity_hessian", **{**over, "estimator": "fd"})
        _close(rule2.gradient(model2, X, Y, _gens())[0], g, 1e-9)


@pytest.mark.parametrize("k", [2, 4])
def test_dropout_implicit_rule_adds_the_probes_xi_to_dropout_k(k):
    """``rule=dropout_implicit estimator=fd_shared``: the DROPOUT_k gradient
    (its masks drawn first) plus ``sqrt(1-1/k)`` times ξ_approx from the
    next draws of the same generator, group multipliers included; the loss
    and the carried hidden state are DROPOUT_k's; ``fd_mid`` differs by
    O(ε²) and runs one LSTM pass fewer."""
    over = dict(k=k, implicit_mult=1.5, implicit_mult_hidden=2.0, explicit_mult_hidden=7.0)  # explicit: unused
    cfg, model, rule = _setup("dropout_implicit", estimator="fd_shared", **over)
    assert rule.noise(model, X, Y, _gens()) is None  # the noise is in the objective
    a, b, w = rule.shared_probe_weights()
    assert (a, b) == (0.0, 1.0) and w["lm.drop_hidden.0"] == 9.0 and w["lm.drop_out"] == 2.25
    g, res = rule.gradient(model, X, Y, _gens())
    gen = torch.Generator().manual_seed(5)
    gk = dc.dropout_k_gradient(model, X, Y, k, generator=gen)
    eps = default_eps(torch.float64) / math.sqrt(2.0)
    xi = dc.implicit_noise(model, X, Y, estimator="fd", noise="rademacher", eps=eps,
                           site_weights=_weights(cfg, "implicit"), generator=gen)
    c = math.sqrt(1.0 - 1.0 / k)
    _close(g, {n: gk[n] + c * xi[n] for n in gk}, 1e-7)
    plain = _setup("dropout", k=k)[2].objective(model, X, Y, _gens())
    assert float(res.loss) == float(plain.loss) and not res.reg
    for (h1, c1), (h2, c2) in zip(res.hidden, plain.hidden):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)
    errs = []
    for eps in (2e-2, 1e-2):
        gs = {}
        for est in ("fd_shared", "fd_mid"):
            cfg, model, rule = _setup("dropout_implicit", backend="fused", estimator=est, eps=eps, **over)
            calls = [0]
            model.lm.rnns[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            gs[est] = torch.cat([v.reshape(-1) for v in rule.gradient(model, X, Y, _gens())[0].values()])
            assert calls[0] == k + (3 if est == "fd_shared" else 2)
        errs.append(float((gs["fd_shared"] - gs["fd_mid"]).norm() / gs["fd_shared"].norm()))
    assert 3.0 < errs[0] / errs[1] < 5.0 and errs[1] < 1e-3, errs


def test_awd_lstm_takes_the_linear_decoder_route():
    """The tied decoder is found: it runs once per objective (the clean pass;
    the perturbed passes stop at its input), and the objective and gradient
    equal those of the full-logit route (``decoder=None``) up to rounding."""
    for rule_name in ("explicit_implicit", "explicit"):
        cfg, model, rule = _setup(rule_name, backend="fused", estimator="fd_shared")
        calls = [0]
        model.lm.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        g, res = rule.gradient(model, X, Y, _gens())
        assert calls[0] == 1
        a, b, w = rule.shared_probe_weights()
        full = dc.analytic_dropout_objective(model, X, Y, explicit_weight=a, implicit_weight=b, generator=5,
                                             eps=default_eps(torch.float64), site_weights=w, decoder=None)
        assert calls[0] == 4  # the full-logit route runs it in all three passes
        _close(g, _grad(model, full.objective), 1e-9)
        assert float(res.reg["R"]) == pytest.approx(float(full.explicit.detach()), rel=1e-9)


@pytest.mark.parametrize("rule_name", ["explicit_implicit", "explicit"])
def test_fd_mid_is_fd_shared_up_to_eps_squared(rule_name):
    """``estimator=fd_mid`` (no clean pass; L, p and the hidden state at the
    probe passes' midpoint) against ``fd_shared`` with the same probe: the
    gradient, the logged loss and R, and the carried hidden state differ by
    O(ε²) (ratio 4 per halving of ε); two LSTM passes instead of three."""
    errs = []
    for eps in (2e-2, 1e-2):
        out = {}
        for est in ("fd_shared", "fd_mid"):
            cfg, model, rule = _setup(rule_name, backend="fused", estimator=est, eps=eps, **COEFS["per-group"])
            calls = [0]
            model.lm.rnns[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            g, res = rule.gradient(model, X, Y, _gens())
            assert calls[0] == (3 if est == "fd_shared" else 2)
            out[est] = (torch.cat([v.reshape(-1) for v in g.values()]), res)
        (ga, ra), (gb, rb) = out["fd_shared"], out["fd_mid"]
        hid = max(float((a - b).abs().max()) for (a, c), (b, d) in zip(ra.hidden, rb.hidden) for a, b in ((a, b), (c, d)))
        assert not any(t.requires_grad for pair in rb.hidden for t in pair)
        errs.append((float((ga - gb).norm() / ga.norm()), abs(float(ra.loss) - float(rb.loss)),
                     abs(float(ra.reg["R"]) - float(rb.reg["R"])), hid))
    for big, small in zip(*errs):
        assert 3.0 < big / small < 5.0, errs
    assert errs[1][0] < 1e-3, errs


def test_incompatible_multipliers_are_refused():
    with pytest.raises(DropcheckError, match=r"tied to the square root of its explicit weight.*hidden: implicit 2"):
        _setup("explicit_implicit", estimator="fd_shared", implicit_mult_hidden=2.0)
    with pytest.raises(DropcheckError, match="0 in both or neither"):
        _setup("explicit_implicit", estimator="fd_shared", explicit_mult_rows=0.0)
    # inactive groups do not count (q_rows = 0), and all-noise / all-explicit always fit
    _setup("explicit_implicit", estimator="fd_shared", q_rows=0.0, explicit_mult_rows=0.0)
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", explicit_mult=0.0, implicit_mult_hidden=3.0)
    a, b, w = rule.shared_probe_weights()
    assert (a, b) == (0.0, 1.0) and w["lm.drop_hidden.0"] == 9.0 and w["lm.drop_out"] == 1.0
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", implicit_mult=0.0, explicit_mult_hidden=3.0)
    assert rule.shared_probe_weights()[:2] == (1.0, 0.0)


def test_only_for_the_rules_that_have_it_and_first_order():
    with pytest.raises(DropcheckError, match="fast path of rules .* only, not of 'loss_jacobian'"):
        _setup("loss_jacobian", estimator="fd_shared")
    with pytest.raises(DropcheckError, match="samples"):
        _setup("explicit_implicit", estimator="fd_shared", samples=2)
    _setup("dropout", estimator="fd_shared")  # unused by rules without an explicit term
    base = make_config("smoke")
    assert not needs_double_backward({**base, "rule": "explicit_implicit", "estimator": "fd_shared"})
    assert not needs_double_backward({**base, "rule": "explicit", "estimator": "fd_shared"})
    assert not needs_double_backward({**base, "rule": "explicit_implicit", "estimator": "fd_mid"})
    with pytest.raises(DropcheckError, match="'fd_mid'.*fast path of rules"):
        _setup("loss_jacobian", estimator="fd_mid")
    for rule in ("identity_hessian", "dropout_implicit"):
        assert not needs_double_backward({**base, "rule": rule, "k": 2, "estimator": "fd_shared",
                                          "ablation_noise": True, "noise_estimator": "autograd"})
    assert needs_double_backward({**base, "rule": "explicit_implicit", "estimator": "fd"})  # autograd noise


def test_several_processes_need_one_kind_of_noise_site():
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared")
    rule.check_world_size(1)
    with pytest.raises(DropcheckError, match="several processes.*q_weights=q_rows=0"):
        rule.check_world_size(2)
    local, shared = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    with pytest.raises(DropcheckError, match="several processes"):
        rule.objective(model, X, Y, Gens(local, shared))
    # per-sequence sites only: each rank's own generator
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", q_weights=0.0, q_rows=0.0)
    rule.check_world_size(2)
    assert rule._probe_generator(Gens(local, shared), *rule.shared_probe_weights()[1:]) is local
    # whole-batch sites only: the generator seeded alike on every rank
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", q_embedding=0.0, q_hidden=0.0, q_output=0.0)
    assert rule._probe_generator(Gens(local, shared), *rule.shared_probe_weights()[1:]) is shared
    # whole-batch sites without noise do not count
    cfg, model, rule = _setup("explicit_implicit", estimator="fd_shared", implicit_mult_weights=0.0,
                              implicit_mult_rows=0.0, explicit_mult_weights=0.0, explicit_mult_rows=0.0)
    rule.check_world_size(2)


def test_it_lowers_the_training_loss():
    cfg, model, rule = _setup("explicit_implicit", backend="fused", estimator="fd_shared")
    before, after = _train_briefly(model, rule)
    assert after < before - 0.05, (before, after)


def test_trainer_runs_it_and_logs_r(tiny_cfg, tiny_corpus, tmp_path):
    from training.pipeline.trainer import train

    cfg = tiny_cfg(rule="explicit_implicit", estimator="fd_shared", max_steps=4, eval_every=2)
    res = train(cfg, out=tmp_path, corpus=tiny_corpus)
    assert res.finished
    evals = [r for r in res.records if r["type"] == "eval"]
    assert len(evals) == 2 and all(r["reg"]["R"] > 0 for r in evals)


@pytest.mark.slow
def test_two_processes_keep_identical_replicas(tiny_cfg, tiny_corpus_dir, tmp_path):
    """The fast path through the DDP backward (locked sites only, each rank's
    own probes): the run finishes and the replicas stay identical."""
    from training.pipeline.trainer import spawn_train

    cfg = tiny_cfg(rule="explicit_implicit", estimator="fd_shared", q_weights=0.0, q_rows=0.0,
                   dtype="float64", max_steps=3, eval_every=0)
    spawn_train(2, [(cfg, {"out": str(tmp_path / "run"), "dump": str(tmp_path / "dump")})],
                corpus_dir=str(tiny_corpus_dir))
    r0, r1 = torch.load(tmp_path / "dump" / "rank0.pt"), torch.load(tmp_path / "dump" / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
