"""Dropout noise, derived symbolically from its definition.

Nothing here is typed in from the paper's results: the only input is the
definition of (inverted) dropout, ``h ← h · m/(1-q)`` with
``m ~ Bernoulli(1-q)``, written as ``h ← (1 + η) ⊙ h``.  From it SymPy
derives

- the two-point law of ``η`` (values and probabilities),
- its moments ``E[ηᵏ]`` and variance,
- the second-order coefficient of the dropout gap, docs/math.md (4.1)-(4.2):
  the expectation of the quadratic Taylor polynomial of the loss in the
  independent per-unit noises; its only surviving terms are the diagonal
  Hessian entries, each with the coefficient ``½ E[η²]`` (which SymPy then
  shows equals ``q/(2(1-q))``; that closed form is never written here),
- the exact enumerated gap ``Σ_masks P(mask) L(η(mask))`` for an abstract
  loss ``L`` (an undefined SymPy function), and its Taylor coefficients in
  ``q`` — the first one is ``Σ_u Δ_u`` (docs/math.md, "When the second-order
  picture holds").
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Optional, Sequence

import sympy as sp

__all__ = [
    "keep_mask_law",
    "eta_law",
    "eta_moment",
    "eta_variance",
    "derived_lambda",
    "second_order_expectation",
    "enumerated_gap",
    "gap_q_coefficient",
    "gap_q_series_by_mask",
    "enumerated_gap_terms",
    "delta_sum",
]


def keep_mask_law(q: sp.Expr) -> list[tuple[sp.Expr, sp.Expr]]:
    """Law of the keep mask ``m ~ Bernoulli(1-q)``: ``[(value, probability)]``."""
    return [(sp.Integer(0), q), (sp.Integer(1), 1 - q)]


def eta_law(q: sp.Expr) -> list[tuple[sp.Expr, sp.Expr]]:
    """Law of ``η = m/(1-q) - 1`` (inverted dropout as ``h ← (1+η) h``).

    Derived from :func:`keep_mask_law`; ``[(value, probability)]`` with the
    *dropped* outcome first.  Values are simplified rational functions of q.
    """
    return [(sp.cancel(m / (1 - q) - 1), p) for m, p in keep_mask_law(q)]


@lru_cache(maxsize=None)
def eta_moment(k: int, q: sp.Expr) -> sp.Expr:
    """``E[ηᵏ]`` from the two-point law (factored rational function of q)."""
    return sp.factor(sp.cancel(sum(p * v**k for v, p in eta_law(q))))


def eta_variance(q: sp.Expr) -> sp.Expr:
    """``Var[η] = E[η²] - E[η]²``."""
    return sp.factor(sp.cancel(eta_moment(2, q) - eta_moment(1, q) ** 2))


def derived_lambda(q: sp.Expr) -> sp.Expr:
    """The coefficient of ``⟨D²ℓ, diag(h²)⟩`` in the second-order gap.

    Obtained by :func:`second_order_expectation` for one unit: the
    coefficient of the Hessian entry ``A₁₁`` in ``E[T₂(η)] - ℓ``.
    """
    coef = second_order_expectation([q])
    return coef["diag"][0]


def _expect_monomials(poly_expr: sp.Expr, etas: Sequence[sp.Symbol], qs: Sequence[sp.Expr]) -> sp.Expr:
    """``E`` of a polynomial in independent ``η_u`` (unit u with drop prob ``qs[u]``)."""
    poly = sp.Poly(sp.expand(poly_expr), *etas)
    total = sp.Integer(0)
    for exps, coeff in poly.terms():
        term = coeff
        for k, q in zip(exps, qs):
            if k:
                term *= eta_moment(k, q)
        total += term
    return total


def second_order_expectation(qs: Sequence[sp.Expr]) -> dict:
    """Expectation of the second-order Taylor polynomial of a loss in the
    independent noises ``η_1..η_M`` (unit u dropped with probability ``qs[u]``).

    ``T₂(η) = ℓ + Σ_u g_u η_u + ½ Σ_{u,v} A_uv η_u η_v`` with placeholder
    symbols ``g`` and symmetric ``A`` (``A_uv = ∂²ℓ/∂η_u∂η_v``; for the
    multiplicative noise ``h_u ← (1+η_u)h_u`` this is
    ``h_u h_v ∂²ℓ/∂h_u∂h_v``).  Returns ``{"expr": E[T₂] - ℓ,
    "diag": [coefficient of A_uu], "first": [coefficient of g_u],
    "offdiag": {(u, v): coefficient of A_uv}}``; the test suite checks that
    ``first`` and ``offdiag`` vanish (no cross-unit / cross-site terms) and
    that ``diag`` is ``q/(2(1-q))``.
    """
    M = len(qs)
    etas = sp.symbols(f"eta_0:{M}")
    g = sp.symbols(f"g_0:{M}")
    A = [[None] * M for _ in range(M)]
    for u in range(M):
        for v in range(u, M):
            A[u][v] = A[v][u] = sp.Symbol(f"A_{u}_{v}")
    T2 = sum(g[u] * etas[u] for u in range(M)) + sp.Rational(1, 2) * sum(
        A[u][v] * etas[u] * etas[v] for u in range(M) for v in range(M)
    )
    ET = sp.expand(_expect_monomials(T2, etas, qs))
    diag = [sp.factor(sp.cancel(ET.coeff(A[u][u]))) for u in range(M)]
    first = [sp.factor(sp.cancel(ET.coeff(g[u]))) for u in range(M)]
    off = {(u, v): sp.factor(sp.cancel(ET.coeff(A[u][v]))) for u in range(M) for v in range(u + 1, M)}
    return {"expr": ET, "diag": diag, "first": first, "offdiag": off, "A": A, "g": g}


def enumerated_gap(L: sp.Function, qs: Sequence[sp.Expr], scale: sp.Expr = sp.Integer(1)) -> sp.Expr:
    """Exact dropout gap ``Σ_masks P(mask) L(scale·η(mask)) - L(0)`` for an
    abstract ``L`` of ``M = len(qs)`` noise arguments, by enumerating all
    ``2^M`` drop patterns of independent units (unit u dropped w.p. ``qs[u]``).
    ``scale`` multiplies the perturbation (``t`` in the tests' expansion)."""
    total = sp.Add(*enumerated_gap_terms(L, qs, scale))
    return total - L(*([sp.Integer(0)] * len(qs)))


def enumerated_gap_terms(L: sp.Function, qs: Sequence[sp.Expr], scale: sp.Expr = sp.Integer(1)):
    """The ``2^M`` terms ``P(mask) L(scale·η(mask))`` of :func:`enumerated_gap`
    (without the ``- L(0)``), one per drop pattern."""
    laws = [eta_law(q) for q in qs]
    for pattern in itertools.product(*laws):
        prob = sp.Integer(1)
        args = []
        for value, p in pattern:
            prob *= p
            args.append(scale * value)
        yield prob * L(*args)


@lru_cache(maxsize=None)
def gap_q_series_by_mask(site_of_unit: tuple, site: Optional[int] = None) -> dict:
    """First Taylor coefficient in ``q`` of the exact enumerated gap, per mask.

    The gap is ``G(q) = Σ_masks P_mask(q) Λ_mask(q) - ℓ(0)`` with
    ``Λ_mask(q) = ℓ(η(mask; q))`` the loss under that drop pattern (an
    undefined SymPy function of ``q`` here, so the derivative is cheap for
    ``2^M`` masks).  ``site=None``: every unit's drop probability is the same
    ``q`` (the series of ``R_drop(q)``); ``site=j``: only site ``j``'s units
    have drop probability ``q``, the others 0 (the partial derivative in
    ``q_j`` at ``q = 0``).  SymPy differentiates ``G`` and sets ``q = 0``;
    the result is ``Σ_mask a_mask Λ_mask(0) + b_mask Λ_mask'(0)``, returned
    as ``{mask bits (1 = dropped): (a, b)}`` for the nonzero pairs.
    """
    q = sp.Symbol("q")
    qs = [q if (site is None or s == site) else sp.Integer(0) for s in site_of_unit]
    funcs = {}
    G = sp.Integer(0)
    for bits in itertools.product((0, 1), repeat=len(qs)):
        prob = sp.Integer(1)
        for b, qu in zip(bits, qs):
            (_, p_drop), (_, p_keep) = keep_mask_law(qu)
            prob *= p_drop if b else p_keep
        f = sp.Function("Lambda_" + "".join(map(str, bits)))(q)
        funcs[bits] = f
        G += prob * f
    d = sp.expand(sp.diff(G, q).subs(q, 0))
    value = {f.subs(q, 0): bits for bits, f in funcs.items()}
    slope = {sp.Subs(sp.Derivative(f, q), q, 0): bits for bits, f in funcs.items()}
    out: dict = {}
    for term in sp.Add.make_args(d):
        coeff, factors = term.as_coeff_mul()
        if len(factors) != 1:
            raise AssertionError(f"unexpected term {term} in the q-series of the gap")
        (f,) = factors
        if f in value:
            a, b = out.get(value[f], (0, 0))
            out[value[f]] = (a + coeff, b)
        elif f in slope:
            a, b = out.get(slope[f], (0, 0))
            out[slope[f]] = (a, b + coeff)
        else:
            raise AssertionError(f"unexpected factor {f} in the q-series of the gap")
    return {k: v for k, v in out.items() if v != (0, 0)}
    return out


def gap_q_coefficient(L: sp.Function, qs: Sequence[sp.Symbol], q: sp.Symbol, order: int = 1,
                      scale: sp.Expr = sp.Integer(1)) -> sp.Expr:
    """Taylor coefficient of order ``order`` in ``q`` of :func:`enumerated_gap`
    with every unit's drop probability replaced by the same ``q``:
    ``(1/order!) dᵒʳᵈᵉʳ/dqᵒʳᵈᵉʳ G(q)|_{q=0}`` (whole sum differentiated, as
    a check of the term-wise :func:`gap_q_derivative`), in terms of the
    abstract ``L`` and its derivatives at the mask points."""
    G = enumerated_gap(L, [q] * len(qs), scale)
    d = sp.diff(G, q, order)
    return sp.expand(d.subs(q, 0) / sp.factorial(order))


def delta_sum(L: sp.Function, M: int, scale: sp.Expr = sp.Integer(1)) -> sp.Expr:
    """``Σ_u Δ_u`` with ``Δ_u = L(unit u zeroed) - L(0) + ∂_u L(0)·(-(-1))``,
    the definition in docs/math.md written for the multiplicative noise:
    zeroing unit u is ``η_u = -1``; ``h_u ∂ℓ/∂h_u = ∂ℓ/∂η_u`` at 0.
    ``scale`` shrinks the deletion to ``η_u = -scale`` (the ``t`` expansion)."""
    xi = sp.symbols(f"xi_0:{M}")
    zero = [sp.Integer(0)] * M
    base = L(*zero)
    total = sp.Integer(0)
    for u in range(M):
        args = list(zero)
        args[u] = -scale
        at = list(zero)
        at[u] = xi[u]
        grad_u = sp.diff(L(*at), xi[u]).subs(xi[u], 0)
        total += L(*args) - base + scale * grad_u
    return total
