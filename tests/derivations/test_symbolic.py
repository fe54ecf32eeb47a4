"""Symbolic-route properties that need no torch: the output Hessian, the
program differentiation against plain ``sympy.diff``, the Gauss-Newton
split, where R_taylor equals R_approx, the q-series of the exact gap, and
spec validation."""

from __future__ import annotations


import numpy as np
import pytest
import sympy as sp
from hypothesis import example, given, settings

import derivations as D
from derivations.cases import _Example, _theta, exact_gap




import torch_helpers as T  # noqa: E402  (tests/derivations is on pytest's pythonpath)


# ---------------------------------------------------------------------------
# output Hessian and loss Jacobian, by simplify


@pytest.mark.parametrize("c", [2, 3])
def test_output_hessian_is_diag_p_minus_ppT(c):
    z = sp.symbols(f"z_0:{c}")
    e = sp.symbols(f"e_0:{c}")
    s = sp.Symbol("s")
    loss = D.loss_of_logits(z, e, s)
    H = sp.hessian(loss, z)
    p = [sp.exp(zc) / sum(sp.exp(zd) for zd in z) for zc in z]
    closed = sp.diag(*p) - sp.Matrix(p) * sp.Matrix(p).T
    assert sp.simplify(H - closed) == sp.zeros(c, c)
    # the derivation uses exactly this differentiation
    sh = D.Shape((2, c), (), (0,))
    d = D.derive(sh)
    assert sp.simplify(sp.Matrix(d.nodes["hess_z"]) - closed) == sp.zeros(c, c)
    for y in range(c):
        onehot = {ec: (1 if k == y else 0) for k, ec in enumerate(e)}
        jac = [sp.diff(loss, zc).xreplace(onehot) for zc in z]
        assert all(sp.simplify(j - (pc - (1 if k == y else 0))) == 0 for k, (j, pc) in enumerate(zip(jac, p)))


# ---------------------------------------------------------------------------
# the program's chain rule vs sympy.diff of one expanded expression

SMALL_SHAPES = [
    D.Shape((2, 2), (), (0,)),
    D.Shape((2, 2, 2), ("tanh",), (0, 1)),
    D.Shape((1, 2, 3), ("sigmoid",), (0,)),
    D.Shape((2, 2, 2), ("softplus",), (1,)),
    D.Shape((2, 1, 2), ("identity",), (0, 1)),
]


def _direct(shape):
    fe = D.forward_expr(shape)
    L = fe["loss"]
    eta = fe["eta"]
    zero = {v: 0 for v in eta}
    g = [sp.diff(L, v) for v in eta]
    out = {
        "loss": L.xreplace(zero),
        "grad_eta": [t.xreplace(zero) for t in g],
        "taylor_u": [sp.diff(t, v).xreplace(zero) for t, v in zip(g, eta)],
        "B": [[sp.diff(t.xreplace(zero), w) for w in fe["theta"]] for t in g],
    }
    return fe, out


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: f"{s.sizes}-{s.activations}-{s.site_layers}")
def test_program_derivatives_equal_plain_sympy_diff(shape):
    d = D.derive(shape)
    fe, direct = _direct(shape)
    args = [fe["theta"], fe["x"], fe["e"], fe["s"]]
    f_direct = sp.lambdify(args, [direct["loss"], direct["grad_eta"], direct["taylor_u"], direct["B"]])
    rng = np.random.default_rng(0)
    for trial in range(3):
        theta = rng.normal(0, 1.5, len(d.theta))
        x = rng.normal(0, 1.0, shape.sizes[0])
        e = np.eye(shape.classes)[trial % shape.classes]
        s = 0.3
        want = f_direct(theta, x, e, s)
        got = d.funcs["point"](theta, x, e, s, np.zeros(d.M), 0.0)
        names = D.network.POINT_OUTPUTS
        assert np.allclose(float(got[names.index("loss")]), want[0], rtol=1e-13, atol=1e-14)
        for key, w in zip(("grad_eta", "taylor_u", "B"), want[1:]):
            g = np.array(got[names.index(key)], dtype=float)
            assert np.allclose(g, np.array(w, dtype=float), rtol=1e-12, atol=1e-13), key
    if shape == SMALL_SHAPES[0]:  # exact symbolic identity on the smallest shape
        for u in range(d.M):
            assert sp.simplify(d.expand(d.nodes["taylor_u"][u]).xreplace({v: 0 for v in d.eta}) - direct["taylor_u"][u]) == 0
            assert sp.simplify(d.expand(d.nodes["grad_eta"][u]).xreplace({v: 0 for v in d.eta}) - direct["grad_eta"][u]) == 0


# ---------------------------------------------------------------------------
# Gauss-Newton split, and where R_taylor = λ R_approx


@settings(deadline=None)
@given(spec=T.specs())
@example(spec=T.saturated_spec())
@example(spec=T.last_linear_spec())
def test_gauss_newton_split_and_series(spec):
    case = D.build_case(spec, with_expressions=False)
    r = case["reference"]
    unw = np.array(r["R_taylor_unweighted"]["per_site"])
    gn = np.array(r["R_approx"]["unweighted"]["per_site"])
    mh = np.array(r["model_hessian_part"]["unweighted"]["per_site"])
    assert T.rel_err(gn + mh, unw) <= 1e-11
    # (b) the q-series of the exact gap: first coefficient = Σ Δ (by definition), per site too
    assert T.rel_err(r["first_order_coefficient"], r["first_order_coefficient_delta"]["total"]) <= T.RTOL
    assert T.rel_err(r["first_order_coefficient_per_site"], r["first_order_coefficient_delta"]["per_site"]) <= T.RTOL
    # the Taylor term's q-slope is ½ Σ h² ∂²ℓ/∂h², the quadratic part of Σ Δ
    assert T.rel_err(r["taylor_first_order_coefficient"]["per_site"], 0.5 * unw) <= 1e-13


def _examples(spec):
    spec = D.normalize_spec(spec)
    d = D.derive(D.spec_shape(spec))
    theta = _theta(spec)
    exs = [_Example(d, theta, x, y) for x, y in zip(np.asarray(spec["X"]), spec["y"])]
    return spec, d, exs


@settings(deadline=None)
@given(spec=T.specs())
@example(spec=T.tiny_q_spec())
def test_exact_gap_over_q_tends_to_delta_sum(spec):
    """R_drop(q)/q → Σ Δ: Richardson-extrapolated at q = 1e-3 (error O(q²))."""
    spec, d, exs = _examples(spec)
    c1 = D.build_case(spec, with_expressions=False)["reference"]["first_order_coefficient"]
    m = len(d.q)

    def f(qv):
        return exact_gap(d, exs, [qv] * m) / qv

    h = 1e-3
    extrap = 2 * f(h / 2) - f(h)
    scale = 1.0 + abs(c1) + max(abs(ex.v["loss"]) for ex in exs)
    assert abs(extrap - c1) <= 1e-4 * scale, (extrap, c1)


@settings(deadline=None)
@given(spec=T.specs())
def test_delta_quadratic_part_is_half_taylor(spec):
    """Δ_u(t) = ℓ(η_u = -t) - ℓ + t ∂ℓ/∂η_u = ½ t² ∂²ℓ/∂η_u² + O(t³)."""
    spec, d, exs = _examples(spec)
    for ex in exs:
        for u in range(d.M):

            def delta(t, u=u, ex=ex):
                eta = np.zeros((1, d.M))
                eta[0, u] = -t
                return float(ex.loss_at(eta)[0]) - ex.v["loss"] + t * ex.v["grad_eta"][u]

            t = 1e-3
            # Richardson on Δ(t)/t² = ½ℓ'' - (t/6)ℓ''' + O(t²)
            extrap = 2 * delta(t / 2) / (t / 2) ** 2 - delta(t) / t**2
            half = 0.5 * ex.v["taylor_u"][u]
            assert abs(extrap - half) <= 1e-4 * (1.0 + abs(half) + abs(ex.v["loss"])), (u, extrap, half)


def test_r_taylor_equals_weighted_r_approx_iff_only_softmax_follows():
    # only softmax after the site: the model-Hessian part is identically zero
    spec = D.normalize_spec(T.last_linear_spec())
    d = D.derive(D.spec_shape(spec))
    assert all(node == 0 for row in d.nodes["d2z"] for node in row)
    assert all(node == 0 for node in d.nodes["model_hessian_u"])
    r = D.build_case(spec, with_expressions=False)["reference"]
    assert r["model_hessian_part"]["weighted"]["total"] == 0.0
    assert T.rel_err(r["R_taylor"], r["R_approx"]["weighted"]["total"]) <= 1e-13
    # a nonlinearity between the site and the logits: a nonzero model-Hessian part
    for name in ("d2-softplus-input", "d2-tanh-input-hidden", "d3-tanh-sigmoid"):
        spec = next(s for s in D.default_specs() if s["name"] == name)
        d = D.derive(D.spec_shape(spec))
        first_site_units = [u for u, j in enumerate(d.unit_site) if j == 0]
        assert any(d.nodes["model_hessian_u"][u] != 0 for u in first_site_units)
        r = D.build_case(spec, with_expressions=False)["reference"]
        mh = r["model_hessian_part"]["weighted"]["per_site"][0]
        assert abs(mh) > 1e-6 * abs(r["R_taylor_per_site"][0])
        assert abs(r["R_taylor"] - r["R_approx"]["weighted"]["total"]) > 1e-8
    # identity activations make the whole network affine: equal again
    spec = next(s for s in D.default_specs() if s["name"] == "d2-identity-input-hidden-c3")
    d = D.derive(D.spec_shape(spec))
    assert all(node == 0 for node in d.nodes["model_hessian_u"])


def test_gap_taylor_ratio_of_emitted_cases_tends_to_the_limit_ratio_not_one(capsys):
    """Bernoulli dropout: R_drop/R_taylor → ΣΔ / (½Σh²∂²ℓ) as q → 0, which is
    in general NOT 1.  Prints the table; asserts the true limit."""
    rows = []
    far_from_one = 0
    for spec in D.default_specs():
        case = D.build_case(spec, with_expressions=False)
        spec_n, d, exs = _examples(spec)
        lim = case["reference"]["limit_ratio"]
        m = len(d.q)
        qv = 1e-6
        lam = float(d.funcs["noise"]([qv] * m)[0][0])
        rt = lam * case["reference"]["R_taylor_unweighted"]["total"]
        ratio_small = exact_gap(d, exs, [qv] * m) / rt
        assert abs(ratio_small - lim) <= 1e-3 * max(1.0, abs(lim)), (spec["name"], ratio_small, lim)
        r = case["gap_taylor_ratio"]
        rows.append((spec["name"], r["0.01"]["ratio"], r["0.05"]["ratio"], r["0.1"]["ratio"], lim))
        far_from_one += abs(lim - 1.0) > 0.05
    assert far_from_one >= len(rows) // 2  # the ratio's limit is not 1 in general
    with capsys.disabled():
        print("\ncase                          q=0.01    q=0.05    q=0.1     limit q→0")
        for name, a, b, c, lim in rows:
            print(f"{name:28s} {a:8.4f}  {b:8.4f}  {c:8.4f}  {lim:8.4f}")


# ---------------------------------------------------------------------------
# spec validation


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(sizes=[2, 3, 1]), "classes"),
        (lambda s: s.update(activations=["relu"]), "unknown activation"),
        (lambda s: s.update(sites=[{"layer": 2, "q": 0.1}]), "site layer"),
        (lambda s: s.update(sites=[{"layer": 0, "q": 1.0}]), "q must lie"),
        (lambda s: s.update(sites=[{"layer": 0, "q": 0.1}, {"layer": 0, "q": 0.2}]), "one site per layer"),
        (lambda s: s.update(sites=[]), "non-empty"),
        (lambda s: s["params"][0].update(weight=[[1.0, 2.0]]), "shape"),
        (lambda s: s.update(X=[[float("nan"), 0.0]]), "non-finite"),
        (lambda s: s.update(y=[5]), "labels"),
        (lambda s: s.update(extra=1), "unknown keys"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_error(mutate, message):
    spec = T.tiny_q_spec()
    mutate(spec)
    with pytest.raises(D.SpecError, match=message):
        D.build_case(spec)


def test_too_many_units_for_enumeration():
    with pytest.raises(D.SpecError, match="max_units"):
        D.random_spec([13, 2], [], [{"layer": 0, "q": 0.1}], seed=0)


def test_implicit_covariance_as_an_expression_in_the_weights():
    """Cov ξ as a SymPy matrix (one example), evaluated, equals the emitted
    numbers; for n = 2 the mean loss's covariance is (1/n²) Σ_n."""
    spec = D.random_spec([2, 2, 2], ["tanh"], [{"layer": 1, "q": 0.3}], n=2, seed=5)
    d = D.derive(D.spec_shape(spec))
    C = d.implicit_cov_expr(expand=True)
    assert C.free_symbols <= set(d.theta) | set(d.x) | set(d.e) | {d.s} | set(d.q)
    f = sp.lambdify([d.theta, d.x, d.e, d.s, d.q], list(C), cse=True)
    theta = _theta(spec)
    P = len(d.theta)
    total = sum(
        np.asarray(f(theta, x, np.eye(2)[y], 0.0, [0.3]), dtype=float).reshape(P, P)
        for x, y in zip(spec["X"], spec["y"])
    )
    ref = np.asarray(D.build_case(spec, with_expressions=False)["reference"]["implicit_cov"])
    assert T.rel_err(total / 4.0, ref) <= 1e-12
