"""The dropout noise, its moments and the second-order coefficient, derived
symbolically (derivations/noise.py), and the q-series of the exact
enumerated gap for an abstract loss L.

Here — in the tests, never in derivations/ — the closed forms of MATH.md are
typed in, to be compared with what SymPy derived from the mask law.
"""

from __future__ import annotations

import itertools

import pytest
import sympy as sp

from derivations import noise as N

q = sp.Symbol("q", positive=True)


def test_eta_law_is_inverted_dropout():
    law = N.eta_law(q)
    assert sp.simplify(sum(p for _, p in law) - 1) == 0
    (v_drop, p_drop), (v_keep, p_keep) = law
    assert v_drop == -1 and p_drop == q
    assert sp.simplify(v_keep - q / (1 - q)) == 0  # 1/(1-q) - 1
    assert sp.simplify(p_keep - (1 - q)) == 0


def test_moments_and_lambda_match_math_md():
    assert N.eta_moment(1, q) == 0
    assert sp.simplify(N.eta_moment(2, q) - q / (1 - q)) == 0
    assert sp.simplify(N.eta_variance(q) - q / (1 - q)) == 0
    lam = N.derived_lambda(q)
    assert sp.simplify(lam - q / (2 * (1 - q))) == 0
    assert lam.subs(q, sp.Rational(2, 5)) == sp.Rational(1, 3)  # MATH.md: 1/3 at q = 0.4
    # every moment of order >= 2 is of order q (why the picture is not a small-q expansion)
    for k in range(2, 6):
        assert sp.limit(N.eta_moment(k, q) / q, q, 0) != 0


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_second_order_expectation_has_only_diagonal_terms(M):
    qs = sp.symbols(f"r_0:{M}", positive=True)
    so = N.second_order_expectation(qs)
    assert all(c == 0 for c in so["first"])  # E[η] = 0
    assert all(c == 0 for c in so["offdiag"].values())  # independence: no cross-unit / cross-site terms
    for c, r in zip(so["diag"], qs):
        assert sp.simplify(c - r / (2 * (1 - r))) == 0


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_first_q_coefficient_of_enumerated_gap_is_delta_sum(M):
    """Literal series: differentiate the whole 2^M-term sum in a common q."""
    L = sp.Function("L")
    qs = sp.symbols(f"r_0:{M}")
    c1 = N.gap_q_coefficient(L, qs, q)
    assert sp.simplify(c1 - N.delta_sum(L, M)) == 0


@pytest.mark.parametrize("sites", [(0,), (0, 0), (0, 1), (0, 0, 1), (0, 1, 1, 2)])
def test_series_by_mask_reproduces_the_literal_series(sites):
    """The per-mask form used by derive() equals the literal series, and the
    per-site partial derivatives add up to the total."""
    M = len(sites)
    L = sp.Function("L")
    qq = sp.Symbol("q")

    def assemble(terms, site):
        total = sp.Integer(0)
        xi = sp.Symbol("xi")
        for bits, (a, b) in terms.items():
            args = [sp.Integer(-1) if bit else sp.Integer(0) for bit in bits]
            total += a * L(*args)
            if b != 0:
                # Λ(q) = L(η(mask; q)); kept units of the varied sites have η = q/(1-q)
                margs = [
                    (sp.Integer(-1) if bit else (xi / (1 - xi) if (site is None or s == site) else sp.Integer(0)))
                    for bit, s in zip(bits, sites)
                ]
                total += b * sp.diff(L(*margs), xi).subs(xi, 0)
        return total

    total = assemble(N.gap_q_series_by_mask(tuple(sites)), None)
    assert sp.simplify((total - N.gap_q_coefficient(L, [qq] * M, qq)).doit()) == 0
    parts = [assemble(N.gap_q_series_by_mask(tuple(sites), j), j) for j in range(max(sites) + 1)]
    assert sp.simplify((sum(parts) - total).doit()) == 0


def test_taylor_term_is_the_quadratic_part_of_delta():
    """Δ_u(t): the deletion shrunk to η_u = -t.  Its expansion in t starts at
    t², with coefficient ½ ∂²L/∂η_u², which is d/dq of the derived
    second-order coefficient at q = 0 times ∂²L/∂η_u²: R_taylor/q → the
    quadratic part of ΣΔ (MATH.md)."""
    L = sp.Function("L")
    t = sp.Symbol("t")
    M = 3
    ser = sp.series(N.delta_sum(L, M, t), t, 0, 3).removeO()
    assert sp.simplify(ser.coeff(t, 0)) == 0 and sp.simplify(ser.coeff(t, 1)) == 0
    xi = sp.symbols(f"xi_0:{M}")
    zero = [0] * M
    second = []
    for u in range(M):
        args = list(zero)
        args[u] = xi[u]
        second.append(sp.diff(L(*args), xi[u], 2).subs(xi[u], 0))
    slope = sp.limit(sp.diff(N.derived_lambda(q), q), q, 0)
    assert slope == sp.Rational(1, 2)
    assert sp.simplify((ser.coeff(t, 2) - slope * sum(second)).doit()) == 0


def test_t2_coefficient_of_exact_gap_is_r_taylor_for_every_q():
    """(4.1)-(4.2) from the enumeration itself: for a general cubic L in the
    noises of 3 units (two sites, q₀, q₁), the t² coefficient of
    E[L(tη)] - L(0) is Σ_u ½E[η_u²] ∂²L/∂η_u² exactly, for all q."""
    q0, q1 = sp.symbols("q0 q1", positive=True)
    qs = [q0, q0, q1]
    eta = sp.symbols("n0:3")
    coeffs = {}
    poly = sp.Integer(0)
    for deg in range(1, 4):
        for mono in itertools.combinations_with_replacement(range(3), deg):
            c = sp.Symbol("c_" + "".join(map(str, mono)))
            coeffs[mono] = c
            poly += c * sp.Mul(*[eta[i] for i in mono])
    Lfun = sp.Lambda(eta, poly)
    t = sp.Symbol("t")
    G = N.enumerated_gap(Lfun, qs, t)
    c2 = sp.expand(sp.diff(G, t, 2).subs(t, 0) / 2)
    hess_diag = [sp.diff(poly, eta[u], 2).subs({v: 0 for v in eta}) for u in range(3)]
    expected = sum(N.derived_lambda(r) * h for r, h in zip(qs, hess_diag))
    assert sp.simplify(c2 - expected) == 0
    # and the t¹ coefficient vanishes (E[η] = 0)
    assert sp.simplify(sp.diff(G, t).subs(t, 0)) == 0
