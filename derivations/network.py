"""Symbolic small MLPs with dropout sites, and every quantity of docs/math.md on them.

A *shape* is ``(sizes, activations, site layers)``; everything here is
derived once per shape with every number symbolic — weights ``θ``, the
input ``x``, the one-hot label ``e``, the drop probabilities ``q_i`` — and
compiled with ``sympy.lambdify(..., cse=True)``; :func:`derive` caches the
result per shape, so spec after spec of one shape costs only evaluation.

Forward pass for one example (``L`` weight layers, ``h_0 = x``)::

    for l = 1..L:
        h'_{l-1} = (1 + η_{l-1}) ⊙ h_{l-1}   if layer l-1 is a dropout site
        a_l = W_l h'_{l-1} + b_l
        h_l = act_l(a_l)                     (l < L)
    z = a_L

with one noise symbol ``η_{i,k}`` per dropped unit (the multiplicative form
of docs/math.md's node dropout).  The pass is built as a
:class:`derivations.program.Program` (one small assignment per unit), and
every derivative below is taken on it exactly by the chain rule with
``sympy.diff`` on each assignment; ``Program.expand`` gives the single
expression in the weights (compared with ``sympy.diff`` of the expanded
loss in the tests).  Loss (cross-entropy, written with a shift
``s`` that cancels exactly and is set to ``max_c z_c`` of the clean logits
when evaluating, so nothing overflows)::

    ℓ(z) = log Σ_c exp(z_c - s) + s - Σ_c e_c z_c

Derived per example (``u`` runs over noise units; at ``η = 0``):

- ``loss_jacobian = ∂ℓ/∂z`` and ``H_out = ∂²ℓ/∂z²`` by differentiation;
- ``gauss_newton_u = (∂z/∂η_u)ᵀ H_out (∂z/∂η_u) = h_u² (JᵀH_outJ)_uu``;
- ``model_hessian_u = Σ_c (∂ℓ/∂z_c) ∂²z_c/∂η_u²``;
- ``taylor_u = ∂²ℓ/∂η_u² = h_u² D²_{h}(ℓ∘F_i)_uu`` (the test suite checks
  ``taylor_u = gauss_newton_u + model_hessian_u``);
- ``R_taylor = Σ_u c_u taylor_u`` with ``c_u`` the coefficient derived in
  :func:`derivations.noise.second_order_expectation` (``½E[η²]``);
- ``Δ_u = ℓ(η_u = -1) - ℓ + ∂ℓ/∂η_u`` and the first Taylor coefficient in
  ``q`` of the exact enumerated gap
  (:func:`derivations.noise.gap_q_series_by_mask`);
- ``b_u = ∇_θ ∂ℓ/∂η_u`` (rows of the implicit-noise Jacobian, (4.5)-(4.6)).

Exact gap: ``ℓ(η)`` compiled as a function of the noise, evaluated on all
``2^M`` drop patterns at once (numpy broadcasting) with the probabilities
and noise values of :func:`derivations.noise.eta_law`.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p

from .noise import eta_law, eta_variance, gap_q_series_by_mask, second_order_expectation
from .program import Program

__all__ = [
    "ACTIVATIONS",
    "Shape",
    "Derivation",
    "derive",
    "clear_cache",
    "is_cached",
    "loss_of_logits",
    "forward_expr",
    "masks",
]


def _sigmoid(a):
    return 1 / (1 + sp.exp(-a))


def _softplus(a):
    return log1p(sp.exp(a))


ACTIVATIONS: dict[str, Callable] = {
    "tanh": sp.tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "identity": lambda a: a,
}


class Shape(NamedTuple):
    """What the symbolic derivation depends on: layer sizes ``[d0, ..., c]``,
    one activation name per hidden layer, and the (sorted) site layers."""

    sizes: tuple
    activations: tuple
    site_layers: tuple

    @property
    def depth(self) -> int:
        return len(self.sizes) - 1

    @property
    def classes(self) -> int:
        return self.sizes[-1]

    @property
    def units(self) -> int:
        return sum(self.sizes[k] for k in self.site_layers)

    @property
    def n_params(self) -> int:
        return sum(self.sizes[l + 1] * self.sizes[l] + self.sizes[l + 1] for l in range(self.depth))


def loss_of_logits(z: Sequence[sp.Expr], e: Sequence[sp.Expr], s: sp.Expr) -> sp.Expr:
    """Cross-entropy ``log Σ exp(z_c - s) + s - Σ e_c z_c`` (``s`` cancels)."""
    return sp.log(sum(sp.exp(zc - s) for zc in z)) + s - sum(ec * zc for ec, zc in zip(e, z))


@dataclass
class Derivation:
    """Symbolic program, expressions and compiled functions of one :class:`Shape`.

    ``program``: the :class:`~derivations.program.Program` holding the
    forward pass and all derivative nodes; ``nodes``: named program nodes
    (lists follow the unit order of ``eta``); ``noise``: SymPy expressions in
    the site symbols ``q`` derived from the noise law; ``funcs``: compiled
    functions (see :func:`derive`).
    """

    shape: Shape
    program: Program
    theta: list  # parameter symbols in torch order
    param_shapes: list  # [(name, shape)]
    x: list
    e: list
    s: sp.Symbol
    q: list  # one symbol per site
    eta: list  # one symbol per unit
    qq: sp.Symbol  # the common-q series variable
    unit_site: list  # site index of each unit
    unit_index: list  # k within the site
    nodes: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    funcs: dict = field(default_factory=dict)
    derive_seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def M(self) -> int:
        return len(self.eta)

    def expand(self, node) -> sp.Expr:
        """A program node as one expression in ``θ, x, e, s, η`` (and ``q``)."""
        return self.program.expand(node)

    def implicit_b(self, expand: bool = True) -> list:
        """Rows ``b_u = ∇_θ ∂ℓ/∂η_u`` at ``η = 0`` (M lists of P expressions in
        ``θ, x, e, s``): ``ξ = Σ_u η_u b_u`` for one example, (4.5)."""
        zero = {v: sp.Integer(0) for v in self.eta}
        if not expand:
            return [list(row) for row in self.nodes["B"]]
        return [[self.expand(t).xreplace(zero) for t in row] for row in self.nodes["B"]]

    def implicit_cov_expr(self, expand: bool = True) -> sp.Matrix:
        """``Cov ξ = Σ_u Var(η_u) b_u b_uᵀ`` for ONE example (n = 1), (4.6),
        as a P × P SymPy matrix in the weights ``θ``, the input ``x``, the
        one-hot label ``e`` (and the cancelling shift ``s``) and the site
        symbols ``q``; ``Var(η)`` is the derived ``eta_variance``.  For ``n``
        examples the mean loss's covariance is ``(1/n²) Σ_n`` of these."""
        rows = self.implicit_b(expand)
        P = len(self.theta)
        cov = sp.zeros(P, P)
        for u, row in enumerate(rows):
            b = sp.Matrix(row)
            cov += self.noise["variance_site"][self.unit_site[u]] * (b * b.T)
        return cov


_CACHE: dict = {}
_LOCK = threading.Lock()


def is_cached(shape: Shape) -> bool:
    """Whether :func:`derive` already holds ``shape``."""
    shape = Shape(tuple(shape.sizes), tuple(shape.activations), tuple(sorted(shape.site_layers)))
    with _LOCK:
        return shape in _CACHE


def clear_cache() -> None:
    """Forget every cached derivation."""
    with _LOCK:
        _CACHE.clear()


def derive(shape: Shape, *, cache: bool = True) -> Derivation:
    """Symbolic derivation and compilation for ``shape`` (cached per shape).

    Compiled functions (``θ`` flat in torch order, ``x`` (d0,), ``e`` one-hot
    (c,), ``s`` the shift, ``η`` (M,) or (M, K) for K noise vectors at once):

    - ``funcs["logits"](θ, x, η)`` -> z (c,)
    - ``funcs["loss"](θ, x, e, s, η)`` -> ℓ (scalar or (K,))
    - ``funcs["point"](θ, x, e, s, η, qq)`` -> the dict-of-lists documented in
      :data:`POINT_OUTPUTS`, meant for ``η = 0, qq = 0``
    - ``funcs["noise"](q)`` -> ``[λ per site, Var η per site, c_u per unit]``
    - ``funcs["eta_law"](q)`` -> ``[[η_dropped, P_dropped], [η_kept, P_kept]]``
    """
    shape = Shape(tuple(shape.sizes), tuple(shape.activations), tuple(sorted(shape.site_layers)))
    key = shape
    if cache:
        with _LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
    d = _derive(shape)
    if cache:
        with _LOCK:
            _CACHE[key] = d
    return d


def _symbols(shape: Shape):
    sizes = shape.sizes
    theta, W, b, pshapes = [], [], [], []
    for l in range(1, shape.depth + 1):
        Wl = [[sp.Symbol(f"W{l}_{o}_{i}") for i in range(sizes[l - 1])] for o in range(sizes[l])]
        bl = [sp.Symbol(f"b{l}_{o}") for o in range(sizes[l])]
        W.append(Wl)
        b.append(bl)
        theta += [w for row in Wl for w in row] + bl
        pshapes += [(f"linear{l}.weight", (sizes[l], sizes[l - 1])), (f"linear{l}.bias", (sizes[l],))]
    x = list(sp.symbols(f"x_0:{sizes[0]}"))
    e = list(sp.symbols(f"e_0:{shape.classes}"))
    s = sp.Symbol("s")
    q = [sp.Symbol(f"q_{k}", positive=True) for k in shape.site_layers]
    eta, unit_site, unit_index, eta_by_site = [], [], [], {}
    for j, k in enumerate(shape.site_layers):
        syms = list(sp.symbols(f"eta_{k}_0:{sizes[k]}"))
        eta_by_site[k] = syms
        eta += syms
        unit_site += [j] * sizes[k]
        unit_index += list(range(sizes[k]))
    return theta, W, b, pshapes, x, e, s, q, eta, unit_site, unit_index, eta_by_site


def _forward(shape: Shape, W, b, x, eta_by_site, let=lambda e, tag="": e):
    """Forward pass (module docstring); ``let`` names intermediate values
    (``Program.let``) or, by default, keeps one nested expression."""
    h = list(x)
    for l in range(1, shape.depth + 1):
        if (l - 1) in eta_by_site:
            h = [let((1 + et) * hk, "h") for et, hk in zip(eta_by_site[l - 1], h)]
        a = [let(sum(W[l - 1][o][i] * h[i] for i in range(len(h))) + b[l - 1][o], "a") for o in range(shape.sizes[l])]
        if l < shape.depth:
            act = ACTIVATIONS[shape.activations[l - 1]]
            h = [let(act(ao), "h") for ao in a]
        else:
            h = a
    return h


def forward_expr(shape: Shape) -> dict:
    """The per-example loss as ONE SymPy expression (no program), for
    independent checks of :func:`derive` with plain ``sympy.diff`` on small
    shapes.  Returns ``{"loss": ℓ(θ, x, e, s, η), "logits": z, "theta",
    "x", "e", "s", "eta"}`` with the same symbols as :func:`derive`."""
    shape = Shape(tuple(shape.sizes), tuple(shape.activations), tuple(sorted(shape.site_layers)))
    theta, W, b, _, x, e, s, _, eta, _, _, eta_by_site = _symbols(shape)
    z = _forward(shape, W, b, x, eta_by_site)
    return {"loss": loss_of_logits(z, e, s), "logits": z, "theta": theta, "x": x, "e": e, "s": s, "eta": eta}


#: Outputs of ``funcs["point"]`` (per example; at ``η = 0``, ``qq = 0``).
POINT_OUTPUTS = (
    "logits",  # z (c,)
    "loss",  # ℓ
    "loss_jacobian",  # ∂ℓ/∂z = p - e_y (c,)
    "H_out",  # ∂²ℓ/∂z² = diag(p) - ppᵀ (c, c)
    "grad_eta",  # ∂ℓ/∂η_u = h_u ∂ℓ/∂h_u (M,)
    "taylor_u",  # ∂²ℓ/∂η_u² = h_u² D²_h(ℓ∘F_i)_uu (M,)
    "gauss_newton_u",  # (∂z/∂η_u)ᵀ H_out ∂z/∂η_u (M,)
    "model_hessian_u",  # Σ_c ∂ℓ/∂z_c ∂²z_c/∂η_u² (M,)
    "B",  # b_u = ∇_θ ∂ℓ/∂η_u (M, P)
    "slopes",  # Λ'_mask(0) of the q-series, one per series term with b ≠ 0
)


def _derive(shape: Shape) -> Derivation:
    t0 = time.perf_counter()
    timings = {}
    c = shape.classes
    theta, W, b, pshapes, x, e, s, q, eta, unit_site, unit_index, eta_by_site = _symbols(shape)
    M = len(eta)
    qq = sp.Symbol("q")
    prog = Program(list(theta) + x + e + [s] + eta + [qq])
    let = prog.let

    # forward pass and loss (the loss is the generic ℓ(z) below at z = F(x))
    z = _forward(shape, W, b, x, eta_by_site, let)
    zs = list(sp.symbols(f"z_0:{c}"))
    ell_z = loss_of_logits(zs, e, s)
    to_z = dict(zip(zs, z))
    loss = let(ell_z.xreplace(to_z), "L")

    # output-space derivatives: differentiate ℓ in generic logits, then plug z in
    jac_z = [sp.diff(ell_z, zc) for zc in zs]
    hess_z = [[sp.diff(jc, zd) for zd in zs] for jc in jac_z]
    loss_jac = [let(j.xreplace(to_z)) for j in jac_z]
    H_out = [[let(h.xreplace(to_z)) for h in row] for row in hess_z]
    timings["forward"] = time.perf_counter() - t0

    # noise derivatives (forward mode on the program; evaluated at η = 0)
    grad_eta = [prog.tangent(loss, v) for v in eta]
    taylor_u = [prog.tangent(g, v) for g, v in zip(grad_eta, eta)]
    dz = [[prog.tangent(zc, v) for zc in z] for v in eta]
    d2z = [[prog.tangent(t, v) for t in row] for row, v in zip(dz, eta)]
    gn_u = [let(sum(dz[u][a] * H_out[a][bb] * dz[u][bb] for a in range(c) for bb in range(c))) for u in range(M)]
    mh_u = [let(sum(loss_jac[a] * d2z[u][a] for a in range(c))) for u in range(M)]
    timings["noise_derivatives"] = time.perf_counter() - t0

    # implicit noise rows b_u = ∇_θ ∂ℓ/∂η_u (reverse mode)
    B = [prog.grad(g, theta) for g in grad_eta]
    timings["implicit"] = time.perf_counter() - t0

    # second-order coefficient of each unit, derived from the noise law
    unit_q = [q[j] for j in unit_site]
    so = second_order_expectation(unit_q)
    coef_u = so["diag"]
    lam_site = [coef_u[unit_site.index(j)] for j in range(len(q))]
    var_site = [eta_variance(qj) for qj in q]
    # d c_u / dq at q = 0: the slope of R_taylor in q (docs/math.md: R_taylor/q → ½ Σ h² ∂²ℓ/∂h²)
    coef_slope_site = [sp.limit(sp.diff(lam, qj), qj, 0) for lam, qj in zip(lam_site, q)]
    timings["noise_law"] = time.perf_counter() - t0

    # first Taylor coefficient in q of the exact enumerated gap:
    # Σ_mask a Λ_mask(0) + b Λ'_mask(0), Λ_mask(q) = ℓ(η(mask; q)) (noise.py)
    law_q = eta_law(qq)
    slopes, series = [], {}
    variants = [None] + list(range(len(q)))
    for site in variants:
        terms = gap_q_series_by_mask(tuple(unit_site), site)
        entries = []
        for bits, (a_m, b_m) in sorted(terms.items()):
            slope_index = None
            if b_m != 0:
                eta_q = {}
                for bit, v, j in zip(bits, eta, unit_site):
                    if site is None or j == site:
                        eta_q[v] = law_q[0][0] if bit else law_q[1][0]
                    else:  # this site's q is 0: its law is the point mass at η = 0
                        eta_q[v] = sp.Integer(-1) if bit else sp.Integer(0)
                # Λ_mask(q) = ℓ with η_u replaced by its value under the mask
                by_site = {k: [eta_q[v] for v in syms] for k, syms in eta_by_site.items()}
                z_m = _forward(shape, W, b, x, by_site, let)
                lam_m = let(ell_z.xreplace(dict(zip(zs, z_m))), "Lq")
                slope_index = len(slopes)
                slopes.append(prog.tangent(lam_m, qq))
            entries.append((bits, sp.Rational(a_m), sp.Rational(b_m), slope_index))
        series["total" if site is None else site] = entries
    timings["q_series"] = time.perf_counter() - t0

    point_tree = [z, loss, loss_jac, H_out, grad_eta, taylor_u, gn_u, mh_u, B, slopes]
    funcs = {
        "logits": prog.compile([theta, x, eta], z),
        "loss": prog.compile([theta, x, e, s, eta], loss),
        "point": prog.compile([theta, x, e, s, eta, qq], point_tree),
        "noise": sp.lambdify([q], [lam_site, var_site, coef_u], modules="numpy"),
        "eta_law": sp.lambdify([qq], [[v, p] for v, p in eta_law(qq)], modules="numpy"),
    }
    timings["lambdify"] = time.perf_counter() - t0
    nodes = {
        "logits": z,
        "loss": loss,
        "loss_jacobian": loss_jac,
        "H_out": H_out,
        "grad_eta": grad_eta,
        "taylor_u": taylor_u,
        "dz": dz,
        "d2z": d2z,
        "gauss_newton_u": gn_u,
        "model_hessian_u": mh_u,
        "B": B,
        "slopes": slopes,
        "loss_z": ell_z,
        "jac_z": jac_z,
        "hess_z": hess_z,
        "z_symbols": zs,
    }
    noise = {
        "coef_u": coef_u,
        "lambda_site": lam_site,
        "variance_site": var_site,
        "coef_slope_site": coef_slope_site,
        "second_order": so,
        "eta_law": eta_law(qq),
    }
    return Derivation(
        shape=shape,
        program=prog,
        theta=theta,
        param_shapes=pshapes,
        x=x,
        e=e,
        s=s,
        q=q,
        eta=eta,
        qq=qq,
        unit_site=unit_site,
        unit_index=unit_index,
        nodes=nodes,
        noise=noise,
        series=series,
        funcs=funcs,
        derive_seconds=time.perf_counter() - t0,
        timings=timings,
    )


def masks(M: int) -> np.ndarray:
    """All ``2^M`` drop patterns (1 = dropped), shape ``(2^M, M)``, in
    ``itertools.product`` order."""
    return np.array(list(itertools.product((0, 1), repeat=M)), dtype=np.int8).reshape(-1, M)
