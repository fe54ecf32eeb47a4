"""Mutation check: the core test families catch a wrong λ and a wrong H_out.

Each family below re-runs the comparisons of one test file on fixed light
cases (the same ``helpers.check_*`` functions and the same thresholds) and
reports whether all of them pass.  Mutations, applied with ``monkeypatch``:

- ``lam2``: ``SiteSpec.lam`` returns ``2 q/(2(1−q))`` (λ off by a factor 2);
- ``hess_identity``: ``quad_form`` (as imported into ``dropcheck._explicit``,
  and in ``dropcheck._common``) always uses ``hessian="identity"``
  (``H_out`` replaced by ``I/c``);
- ``var2``: ``SiteSpec.variance`` doubled (what the implicit-noise
  covariance reads instead of λ).

``EXPECTED`` states, for every family and mutation, whether the family must
catch it (fail) or, where the family's quantity does not involve the mutated
constant at all, must still pass (so the table is verified, not assumed).
"""

from __future__ import annotations


import pytest
import torch

import dropcheck as dc
import dropcheck._common
import dropcheck._explicit
import dropcheck._sites




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
TOL = 1e-9

MLP = dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=1.5, n=3, seed=1)
LAST = dict(sizes=[3, 4, 3], acts=["tanh"], sites={1: 0.3}, scale=2.0, n=3, seed=2)
TINY = dict(sizes=[2, 2, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=2, seed=2)


# ---------------------------------------------------------------------------
# families: each returns {check: (measured, passed)}


def fam_explicit_exact():
    model, X, y = cases.build(MLP)
    e1 = checks.check_explicit_exact(model, X, y)
    e2 = checks.check_explicit_exact(*cases.build(cases.SATURATED))
    return {"mlp": (e1, e1 < TOL), "saturated": (e2, e2 < TOL)}


def fam_closed_form():
    e = checks.check_softmax_regression(4, 3, 5, 0.3, 0)
    return {"softmax regression": (e, e < TOL)}


def fam_taylor():
    model, X, y = cases.build(MLP)
    e1 = checks.check_taylor(model, X, y)
    e2 = checks.check_taylor_equals_explicit(*cases.build(LAST))
    e3, size = checks.check_model_hessian_term(model, X, y)
    return {"vs dense Hessian": (e1, e1 < TOL), "= explicit (linear tail)": (e2, e2 < TOL),
            "model-Hessian term": (e3, e3 < TOL and size > 1e-2)}


def fam_first_order():
    model, X, y = cases.build(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=2.0, n=1, seed=0))
    r = checks.check_first_order(model, X, y, 1e-5)
    return {"gap/q vs first_order": (r["gap/q vs first_order"], r["gap/q vs first_order"] < 1e-3),
            "first_order vs loop": (r["first_order vs loop"], r["first_order vs loop"] < 1e-12)}


def fam_width_limit():
    out, devs = {}, []
    for w in (4, 16, 64):
        model = cases.width_net(w, seed=0)
        X, y = cases.data(8, 4, 3, seed=0)
        rt, re = checks.limit_ratio(model, X, y)
        devs.append(abs(rt - 1))
        out[f"routes agree w={w}"] = (stats.rel(rt, re), stats.rel(rt, re) < 1e-9)
    out["monotone, <2% at 64"] = (devs[-1], devs[0] > devs[1] > devs[2] and devs[-1] < 0.02)
    return out


def fam_gaussian_gap():
    def net(q):
        m = cases.mlp([3, 3, 3], ["tanh"], {1: q}, seed=4, scale=2.0, out_scale=3.0, site_cls=dc.GaussianDropout)
        return (m, *cases.data(1, 3, 3, seed=4))

    devs, out = [], {}
    for q in (0.2, 0.05, 0.0125):
        m, X, y = net(q)
        quad = refs.bf_gaussian_gap(m, X, y, q)
        devs.append(abs(quad / float(dc.taylor_regularizer(m, X, y).detach()) - 1))
        r_e = quad / float(dc.explicit_regularizer(m, X, y).detach())  # second route (linear tail)
    out["quadrature trend"] = (devs[-1], all(b < 0.5 * a for a, b in zip(devs, devs[1:])) and devs[-1] < 2e-3)
    out["R_approx route"] = (abs(r_e - 1), abs(r_e - 1) < 2e-3)
    m, X, y = net(0.0125)
    est = dc.dropout_gap(m, X, y, samples=4000, antithetic=True, generator=5)
    z = (est.value - refs.bf_gaussian_gap(m, X, y, 0.0125)) / est.stderr
    out["MC vs quadrature"] = (z, abs(z) < stats.Z_MAX)
    return out


def fam_estimators():
    model, X, y = cases.build(MLP)
    out = {}
    for est in ("sampled", "hutchinson", "fd"):
        z = checks.check_estimator_unbiased(model, X, y, est, calls=100, samples=8, seed=11)
        out[est] = (z, abs(z) < stats.Z_MAX)
    return out


def fam_fd_bias():
    ratio, size = checks.fd_bias_ratio(*cases.build(MLP), 0.08)
    return {"ratio ≈ 4": (ratio, abs(ratio - 4) < 0.05 and size > 1e-6)}


def fam_noise_cov_exact():
    e = checks.check_noise_cov_exact(*cases.build(MLP))
    return {"Cov(ξ_approx) vs Jacobian route": (e, e < 1e-10)}


def fam_noise_cov_empirical():
    z = checks.check_noise_cov_empirical(*cases.build(MLP), n=300, seed=4)
    return {k: (v, abs(v) < stats.Z_MAX) for k, v in z.items()}


def fam_dropout_noise():
    model, X, y = cases.build(TINY)
    out = {}
    z = checks.check_two_draw(model, X, y, n=300, seed=2)
    out["two-draw = 2 Cov"] = (z, abs(z) < stats.Z_MAX)
    z = checks.check_dropout_k(model, X, y, 2, n=200, seed=2)
    out["DROPOUT_2 = Cov/2"] = (z, abs(z) < stats.Z_MAX)
    z = checks.check_dropout_k(model, X, y, 2, n=200, seed=12, injected=True)
    out["injected = Cov"] = (z, abs(z) < stats.Z_MAX)
    return out


def fam_structures():
    model = cases.ElmanLocked(d=2, hidden=3, classes=3, seed=1)
    X, y = cases.seq_data(4, 2, 2, 3, seed=1)
    wd = cases.WeightDropRNN(seed=2)
    Xw, yw = cases.seq_data(4, 2, 2, 3, seed=2)
    out = {}
    for name, (m, a, b) in {"locked": (model, X, y), "dropconnect": (wd, Xw, yw)}.items():
        e = checks.check_explicit_exact(m, a, b)
        out[f"{name} exact"] = (e, e < TOL)
        e = checks.check_taylor(m, a, b)
        out[f"{name} taylor"] = (e, e < TOL)
        for est in ("sampled", "hutchinson", "fd"):
            z = checks.check_estimator_unbiased(m, a, b, est, calls=60, samples=8, seed=17)
            out[f"{name} {est}"] = (z, abs(z) < stats.Z_MAX)
    return out


def fam_differentiability():
    """∇ explicit_regularizer (exact) vs central differences of its own value
    (self-consistency) and of the dense-route value (the right quantity)."""
    model, X, y = cases.build(MLP)
    g = cases.gen(0)
    d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    dc.explicit_regularizer(model, X, y).backward()
    an = sum(float((p.grad * v).sum()) for p, v in zip(model.parameters(), d) if p.grad is not None)

    def cdiff(fn):
        vals = []
        with torch.no_grad():
            for s in (1e-5, -1e-5):
                for p, v in zip(model.parameters(), d):
                    p.add_(s * v)
                vals.append(float(fn()))
                for p, v in zip(model.parameters(), d):
                    p.sub_(s * v)
        return (vals[0] - vals[1]) / 2e-5

    e1 = stats.rel(an, cdiff(lambda: dc.explicit_regularizer(model, X, y)))
    e2 = stats.rel(an, cdiff(lambda: sum(refs.bf_explicit(model, X, y).values())))
    return {"grad vs FD of own value": (e1, e1 < 1e-6), "grad vs FD of dense value": (e2, e2 < 1e-6)}


FAMILIES = {
    "explicit_exact": fam_explicit_exact,
    "closed_form": fam_closed_form,
    "taylor": fam_taylor,
    "first_order": fam_first_order,
    "width_limit": fam_width_limit,
    "gaussian_gap": fam_gaussian_gap,
    "estimators": fam_estimators,
    "fd_bias": fam_fd_bias,
    "noise_cov_exact": fam_noise_cov_exact,
    "noise_cov_empirical": fam_noise_cov_empirical,
    "dropout_noise": fam_dropout_noise,
    "structures": fam_structures,
    "differentiability": fam_differentiability,
}

# True: the family must catch the mutation; False: the family's quantity does
# not involve the mutated constant (it must still pass).
EXPECTED = {
    #                        lam2   hess_identity  var2
    "explicit_exact": (True, True, False),
    "closed_form": (True, True, False),
    "taylor": (True, True, False),
    "first_order": (False, False, False),  # R_drop, Σ Δ: no λ, no H_out
    "width_limit": (False, True, False),  # unweighted ratio: λ cancels
    "gaussian_gap": (True, True, False),
    "estimators": (True, True, False),  # (sampled alone does not use quad_form)
    "fd_bias": (False, False, False),  # a ratio of two fd biases: invariant
    "noise_cov_exact": (False, False, True),
    "noise_cov_empirical": (False, False, False),  # implicit_noise draws η from q directly
    "dropout_noise": (False, False, False),  # sampled dropout: no λ, no H_out
    "structures": (True, True, False),
    "differentiability": (True, True, False),
}
MUTATIONS = ("lam2", "hess_identity", "var2")


def apply(monkeypatch, mutation):
    spec = dropcheck._sites.SiteSpec
    if mutation == "lam2":
        orig = spec.lam
        monkeypatch.setattr(spec, "lam", property(lambda s: 2.0 * orig.fget(s)))
    elif mutation == "var2":
        orig = spec.variance
        monkeypatch.setattr(spec, "variance", property(lambda s: 2.0 * orig.fget(s)))
    elif mutation == "hess_identity":
        orig_qf = dropcheck._common.quad_form

        def quad_form_identity(p, u, hessian="output"):
            return orig_qf(p, u, "identity")

        monkeypatch.setattr(dropcheck._common, "quad_form", quad_form_identity)
        monkeypatch.setattr(dropcheck._explicit, "quad_form", quad_form_identity)
    elif mutation != "none":
        raise ValueError(mutation)


def run_family(name):
    res = FAMILIES[name]()
    return all(ok for _, ok in res.values()), res


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_passes_unmutated(family):
    ok, res = run_family(family)
    assert ok, res


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_catches_mutation(monkeypatch, family, mutation):
    apply(monkeypatch, mutation)
    ok, res = run_family(family)
    must_catch = EXPECTED[family][MUTATIONS.index(mutation)]
    if must_catch:
        assert not ok, f"{family} did not catch {mutation}: {res}"
    else:
        assert ok, f"{family} changed under {mutation}, which its quantity does not involve: {res}"


def test_per_estimator_hessian_mutation():
    """Under hess_identity: exact, hutchinson and fd are caught individually;
    the sampled estimator draws labels y' ~ p (E[ggᵀ] = JᵀH_out J) and never
    calls quad_form, so it is unaffected (this mutation cannot reach it)."""
    model, X, y = cases.build(MLP)
    with pytest.MonkeyPatch.context() as mp:
        apply(mp, "hess_identity")
        zs = {est: checks.check_estimator_unbiased(model, X, y, est, calls=100, samples=8, seed=11)
              for est in ("sampled", "hutchinson", "fd")}
    assert abs(zs["sampled"]) < stats.Z_MAX
    assert abs(zs["hutchinson"]) > 10 and abs(zs["fd"]) > 10, zs
