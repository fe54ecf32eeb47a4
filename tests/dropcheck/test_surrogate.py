"""analytic_dropout_objective: its gradient is Algorithm 2's update, built
from the independently tested fd estimators with the same probe (the noise
part up to O(ε²), the order measured); its explicit value is unbiased and
its noise has ξ_approx's covariance (dense references); the linear-decoder
route (S4) is taken where it applies and agrees with the full-logit route."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dc_cases as cases
import dc_references as refs
import dc_stats as stats
import dropcheck as dc
from dropcheck._cases import CASES

H_SMALL = dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=1.5, n=4, seed=1)


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def _grads(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params, allow_unused=True,
                                                                  materialize_grads=True, retain_graph=True)])


@pytest.mark.parametrize("decoder", ["auto", None])
@pytest.mark.parametrize("case", ["mlp-tanh", "locked-rnn", "dropconnect"])
@given(seed=st.integers(0, 2**31 - 1), a=st.sampled_from([0.0, 1.0, 2.0]), b=st.sampled_from([0.0, 1.0, 0.5]),
       indep=st.booleans())
@settings(deadline=None)
def test_gradient_is_explicit_plus_implicit(case, decoder, seed, a, b, indep):
    """Route B: the same probe ``v`` through the separately tested fd
    estimators.  ``R̂`` is the same difference quotient (S1)/(S4), equal up to
    the rounding of ``u`` (``u_mach/ε`` ≈ 2e-12 at ε = 1e-4; bit-near for the
    full-logit route); the noise part is the first-order form (S3) of
    ``implicit_noise(estimator="fd")``, equal up to ``O(ε²)`` = 1e-8 relative."""
    c = CASES[case]()
    model, X, y = c.model, c.inputs, c.targets
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    eps = 1e-4
    obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=a, implicit_weight=b, generator=seed, eps=eps,
                                        independent_positions=indep, decoder=decoder)
    got = _grads(obj.objective, params)
    R = dc.explicit_regularizer(model, X, y, estimator="fd", generator=seed, eps=eps, independent_positions=indep)
    if a or b:  # with both terms off no probe pass runs
        rel = 1e-12 if decoder is None else 1e-9
        assert float(R.detach()) == pytest.approx(float(obj.explicit.detach()), rel=rel, abs=1e-15)
    g_lr = torch.autograd.grad(obj.loss + a * R, params, allow_unused=True, materialize_grads=True)
    xi = dc.implicit_noise(model, X, y, estimator="fd", noise="rademacher", generator=seed, eps=eps / math.sqrt(2),
                           independent_positions=indep)
    want = torch.cat([g.reshape(-1) for g in g_lr]) + b * _flat({n: xi[n] for n in names})
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-6 * scale, float((got - want).abs().max()) / scale


@pytest.mark.parametrize("case", ["mlp-softplus-deep", "locked-rnn"])
def test_noise_part_is_xi_approx_up_to_eps_squared(case):
    """The gradient of the implicit part (S3) against the double-backward
    ``ξ_approx`` (same η): the error falls as ε² (ratio 4 per halving), and a
    wrong constant (√2 → 1) would leave an O(1) error."""
    c = CASES[case]()
    model, X, y = c.model, c.inputs, c.targets
    params = list(model.parameters())
    xi = _flat(dc.implicit_noise(model, X, y, estimator="autograd", generator=3))

    def err(eps):
        obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=0.0, implicit_weight=1.0, generator=3,
                                            eps=eps)
        g = _grads(obj.objective - obj.loss, params)
        return float((g - xi).norm() / xi.norm())

    e1, e2 = err(2e-2), err(1e-2)
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)
    assert e2 < 1e-2


def test_implicit_probe_matches_autograd_noise_in_expectation_of_direction():
    # ξ̂ (fd) agrees with the double-backward ξ_approx for the same η up to O(ε²)
    c = CASES["mlp-softplus-deep"]()
    model, X, y = c.model, c.inputs, c.targets
    params = list(model.parameters())
    obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=0.0, implicit_weight=1.0, generator=3, eps=1e-5)
    g = torch.autograd.grad(obj.objective - obj.loss, params)
    xi = dc.implicit_noise(model, X, y, estimator="autograd", generator=3)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in g]), _flat(xi), rtol=1e-6, atol=1e-9)


def test_explicit_part_is_unbiased_and_noise_covariance_is_xi_approx():
    """Over independent probes: the mean of ``R̂`` is the dense ``R_approx``
    (4.4), and the noise gradient has ξ_approx's covariance ``Σ_u Var(η_u) b_u
    b_uᵀ`` (dense reference) along a fixed direction and in trace, mean 0."""
    model, X, y = cases.build(H_SMALL)
    params = list(model.parameters())
    target = sum(refs.bf_explicit(model, X, y).values())
    C = refs.bf_noise_cov(model, X, y)
    r = stats.direction(C.shape[0], 5)
    g = cases.gen(4)
    vals, proj, sq, lin = [], [], [], []
    for _ in range(300):
        obj = dc.analytic_dropout_objective(model, X, y, explicit_weight=1.0, implicit_weight=1.0, generator=g)
        vals.append(float(obj.explicit.detach()))
        xi = _grads(obj.implicit_probe, params)
        proj.append(float(xi @ r) ** 2)
        sq.append(float(xi @ xi))
        lin.append(float(xi @ r))
    z = {"R": stats.zscore(vals, target), "proj": stats.zscore(proj, float(r @ C @ r)),
         "trace": stats.zscore(sq, float(C.trace())), "mean": stats.zscore(lin, 0.0)}
    assert all(abs(v) < stats.Z_MAX for v in z.values()), z


class _Scaled(nn.Module):
    """Logits that are not a Linear's output (2 · Linear)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2.0 * self.inner(x)


def _count_calls(m):
    n = [0]
    m.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def test_linear_decoder_route_is_taken_and_matches_full_logits():
    """``decoder="auto"``: a trailing nn.Linear runs once (the clean pass; the
    perturbed passes stop at its input); where the route does not apply (a
    site inside the decoder, logits that are not its output) the full logits
    are used; both routes give the same objective and gradient."""
    torch.manual_seed(0)
    tail = nn.Linear(6, 4).double()
    plain = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), tail).double()
    inside = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3),
                           dc.WeightDrop(nn.Linear(6, 4), ["weight"], 0.2)).double()
    scaled = _Scaled(plain)
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(1))
    for model, last, fast in ((plain, plain[3], True), (inside, inside[3].module, False), (scaled, plain[3], False)):
        n = _count_calls(last)
        params = list(model.parameters())
        res = {}
        for decoder in ("auto", None):
            n[0] = 0
            obj = dc.analytic_dropout_objective(model, X, y, generator=7, decoder=decoder)
            res[decoder] = (obj, _grads(obj.objective, params))
            assert n[0] == (1 if (fast and decoder == "auto") else 3), (type(model).__name__, decoder, n[0])
        (oa, ga), (on, gn) = res["auto"], res[None]
        for f in ("objective", "loss", "explicit", "implicit_probe"):
            assert float(getattr(oa, f).detach()) == pytest.approx(float(getattr(on, f).detach()), rel=1e-8, abs=1e-12)
        assert torch.allclose(ga, gn, rtol=1e-8, atol=1e-11)
    # an explicit decoder must apply
    given_tail = dc.analytic_dropout_objective(plain, X, y, generator=7, decoder=tail).objective
    auto = dc.analytic_dropout_objective(plain, X, y, generator=7).objective
    assert float(given_tail.detach()) == float(auto.detach())
    with pytest.raises(dc.DropcheckError, match="parameters or input rows differ between the passes"):
        dc.analytic_dropout_objective(inside, X, y, generator=7, decoder=inside[3].module)
    with pytest.raises(dc.DropcheckError, match="not the output of its last nn.Linear"):
        dc.analytic_dropout_objective(scaled, X, y, generator=7, decoder=plain[3])
    with pytest.raises(dc.DropcheckError, match="plain nn.Linear"):
        dc.analytic_dropout_objective(plain, X, y, decoder=plain[1])
    with pytest.raises(dc.DropcheckError, match="not a module of the model"):
        dc.analytic_dropout_objective(plain, X, y, decoder=nn.Linear(6, 4).double())


@pytest.mark.parametrize("case", ["mlp-tanh", "locked-rnn", "dropconnect", "mlp-softplus-deep"])
def test_midpoint_is_the_clean_route_up_to_eps_squared(case):
    """``center="midpoint"`` (S7): the same probes (same generator), no clean
    pass; objective value, loss and gradient differ from the clean route by
    O(ε²), measured as a ratio of 4 per halving of ε."""
    c = CASES[case]()
    model, X, y = c.model, c.inputs, c.targets
    params = list(model.parameters())
    errs = []
    for eps in (2e-2, 1e-2):
        res = {}
        for center in ("clean", "midpoint"):
            obj = dc.analytic_dropout_objective(model, X, y, generator=3, eps=eps, center=center)
            res[center] = (_grads(obj.objective, params), float(obj.loss.detach()), float(obj.explicit.detach()))
        (ga, la, ra), (gb, lb, rb) = res["clean"], res["midpoint"]
        errs.append((float((ga - gb).norm() / ga.norm()), abs(la - lb), abs(ra - rb)))
    for big, small in zip(*errs):
        assert 3.0 < big / small < 5.0, errs


def test_midpoint_runs_two_passes_and_falls_back_without_a_linear_decoder():
    torch.manual_seed(0)
    tail = nn.Linear(6, 4).double()
    plain = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), tail).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(1))
    first = _count_calls(plain[0])
    n = _count_calls(tail)
    dc.analytic_dropout_objective(plain, X, y, generator=1, center="midpoint")  # finds the decoder (one pass)
    first[0] = n[0] = 0
    dc.analytic_dropout_objective(plain, X, y, generator=1, center="midpoint")
    assert (first[0], n[0]) == (2, 0)  # two probe passes, the decoder's matmul done by the head
    dc.analytic_dropout_objective(plain, X, y, generator=1, center="midpoint", decoder=tail)
    assert (first[0], n[0]) == (4, 0)
    # no linear decoder: the clean route (three full passes), same values as center="clean"
    scaled = _Scaled(plain)
    first[0] = 0
    a = dc.analytic_dropout_objective(scaled, X, y, generator=1, center="midpoint")
    b = dc.analytic_dropout_objective(scaled, X, y, generator=1)
    assert first[0] == 2 * 3 + 1  # detection pass, then three passes (and three for b)
    assert float(a.objective.detach()) == float(b.objective.detach())
    with pytest.raises(dc.DropcheckError, match="center"):
        dc.analytic_dropout_objective(plain, X, y, center="middle")


@pytest.mark.parametrize("hessian", ["output", "identity"])
@pytest.mark.parametrize("with_decoder", [False, True])
def test_logit_head_matches_autograd_of_the_plain_formulas(hessian, with_decoder):
    """(S2), (S3), ``L`` and the hand-written gradients (S5)-(S6) (and, with a
    decoder, ``u = Δ Wᵀ`` and its two matmul gradients) against autograd of
    the plain formulas, for every combination of outputs used; a central
    difference of the objective along a random direction as a third route;
    a second backward through the same graph (its buffers consumed by the
    first) gives the same gradient."""
    from dropcheck._common import quad_form
    from dropcheck._surrogate import logit_head

    g = torch.Generator().manual_seed(0)
    N, c, d = 7, 5, 3
    Z = (3 * torch.randn(N, c, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, c, (N,), generator=g)
    if with_decoder:
        delta = torch.randn(N, d, generator=g, dtype=torch.float64).requires_grad_()
        W = torch.randn(c, d, generator=g, dtype=torch.float64).requires_grad_()
        leaves = [Z, delta, W]
    else:
        u0 = torch.randn(N, c, generator=g, dtype=torch.float64).requires_grad_()
        leaves = [Z, u0]

    def fast(*xs):
        return logit_head(xs[0], xs[1], y, hessian, W=xs[2] if with_decoder else None)

    def plain(*xs):
        u = xs[1] @ xs[2].t() if with_decoder else xs[1]
        p = torch.softmax(xs[0], -1)
        return (torch.nn.functional.cross_entropy(xs[0], y), quad_form(p, u, hessian).mean(),
                ((p - torch.nn.functional.one_hot(y, c)) * u).sum(1).mean())

    for a_, b_ in zip(fast(*leaves), plain(*leaves)):
        assert float(a_.detach()) == pytest.approx(float(b_.detach()), rel=1e-12, abs=1e-15)
    for ws in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.7, 0.0), (1.0, 0.0, -0.4), (0.3, 1.3, 2.0)]:
        def scalar(fn, xs):
            return sum(w * t for w, t in zip(ws, fn(*xs)) if w)

        got = torch.autograd.grad(scalar(fast, leaves), leaves, allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(scalar(plain, leaves), leaves, allow_unused=True, materialize_grads=True)
        for x1, x2 in zip(got, want):
            assert torch.allclose(x1, x2, rtol=1e-10, atol=1e-14), ws
        # third route: central difference along a random direction
        dirs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in leaves]
        h = 1e-5
        with torch.no_grad():
            fp = scalar(fast, [x + h * v for x, v in zip(leaves, dirs)])
            fm = scalar(fast, [x - h * v for x, v in zip(leaves, dirs)])
        directional = sum(float((gr * v).sum()) for gr, v in zip(got, dirs))
        assert float(fp - fm) / (2 * h) == pytest.approx(directional, rel=1e-7, abs=1e-10)
    # the first backward reuses the buffers; a second one through the same graph recomputes them
    outs = fast(*leaves)
    first = torch.autograd.grad(outs[0] + 0.7 * outs[1] + 0.3 * outs[2], leaves, retain_graph=True)
    again = torch.autograd.grad(outs[0] + 0.7 * outs[1] + 0.3 * outs[2], leaves, retain_graph=True)
    loss_only = torch.autograd.grad(outs[0], leaves, allow_unused=True, materialize_grads=True)
    for x1, x2 in zip(first, again):
        assert torch.equal(x1, x2)
    for x1, x2 in zip(loss_only, torch.autograd.grad(plain(*leaves)[0], leaves, allow_unused=True,
                                                     materialize_grads=True)):
        assert torch.allclose(x1, x2, rtol=1e-10, atol=1e-14)


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
