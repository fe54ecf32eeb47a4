"""Check functions: one per test family, each returning the measured
discrepancy between dropcheck and a reference of ``dc_references`` (a
relative error, a z-score, a ratio).  The test files assert on these numbers
and ``test_mutations.py`` re-runs them with dropcheck deliberately broken
(λ doubled, H_out replaced by the identity) to show they catch it.
"""

from __future__ import annotations

import copy

import torch

import dropcheck as dc
from dc_cases import data, gen, mlp
from dc_references import (
    Wired,
    bf_deletions,
    bf_dropout_grad_moments,
    bf_explicit,
    bf_gap_enum,
    bf_noise_cov,
    bf_taylor,
    classify,
    softmax_regression_closed_form,
)
from dc_stats import FLOOR, U64, direction, flat, max_rel, rel, scaled_err, zscore


def check_explicit_exact(model, X, y, *, weighted=True, hessian="output") -> float:
    """Max relative error (see ``FLOOR``), per site call and for the total, of
    ``explicit_regularizer("exact")`` vs the dense Jacobian route."""
    got = dc.explicit_regularizer(model, X, y, estimator="exact", weighted=weighted, hessian=hessian, per_site=True)
    ref, scales = bf_explicit(model, X, y, weighted=weighted, hessian=hessian, scale=True)
    err = scaled_err({k: float(v.detach()) for k, v in got.items()}, ref, scales)
    tot = float(dc.explicit_regularizer(model, X, y, estimator="exact", weighted=weighted, hessian=hessian).detach())
    return max(err, scaled_err({"t": tot}, {"t": sum(ref.values())}, {"t": sum(scales.values())}))


def check_softmax_regression(d, c, n, q, seed, logit_scale=1.0, relative_only=False) -> float:
    """``nn.Sequential(nn.Dropout(q), nn.Linear(d, c))`` vs the closed form."""
    model = mlp([d, c], [], {0: q}, seed=seed, scale=logit_scale)
    X, y = data(n, d, c, seed=seed)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    ref = softmax_regression_closed_form(W, b, X, q)
    p = torch.softmax(X @ W.T + b, -1)
    scale = q / (2 * (1 - q)) * float((X**2 * (p @ W**2)).sum(1).mean())
    got = float(dc.explicit_regularizer(model, X, y).detach())
    if relative_only:
        return rel(got, ref)
    return scaled_err({"t": got}, {"t": ref}, {"t": scale})


def check_taylor(model, X, y, *, weighted=True) -> float:
    """Max relative error per site call of ``taylor_regularizer`` vs ``Σ_ab
    (∂²L/∂h²)_ab C_ab`` with the dense autograd Hessian."""
    got = dc.taylor_regularizer(model, X, y, weighted=weighted, per_site=True)
    return max_rel({k: float(v.detach()) for k, v in got.items()}, bf_taylor(model, X, y, weighted=weighted))


def check_taylor_equals_explicit(model, X, y) -> float:
    """Relative difference (``FLOOR`` convention) of ``taylor_regularizer`` and
    the weighted ``explicit_regularizer``: 0 up to rounding where only the
    softmax follows every site."""
    t = float(dc.taylor_regularizer(model, X, y).detach())
    e = float(dc.explicit_regularizer(model, X, y).detach())
    ref, scales = bf_explicit(model, X, y, scale=True)
    return abs(t - e) / max(abs(e), FLOOR * sum(scales.values()), 1e-300)


def check_model_hessian_term(model, X, y) -> tuple[float, float]:
    """``(err, size)``: dropcheck's ``taylor − explicit`` vs the dense route's
    model-Hessian term ``Σ_c ∂ℓ/∂z_c ⟨D²F_c, C⟩`` (error relative to the
    dense taylor value), and that term's size relative to the dense taylor."""
    t = float(dc.taylor_regularizer(model, X, y).detach())
    e = float(dc.explicit_regularizer(model, X, y).detach())
    bt = sum(bf_taylor(model, X, y).values())
    be = sum(bf_explicit(model, X, y).values())
    return abs((t - e) - (bt - be)) / max(abs(bt), 1e-300), abs(bt - be) / max(abs(bt), 1e-300)


def check_first_order(model, X, y, q_small=1e-5) -> dict:
    """The first-order identity ``lim R_drop/q = Σ Δ``: relative errors of
    (a) dc exact gap at tiny q / q vs dc.first_order_gap, (b) first_order_gap
    vs the test's own deletion loop, (c) dc exact gap vs the test's own
    enumeration of the real masks."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if classify(mod) is not None and mod.p > 0:
            mod.p = q_small
    fo = dc.first_order_gap(m, X, y)
    est = dc.dropout_gap(m, X, y, exact=True, max_units=16)
    gap = est.value
    mine = sum(bf_deletions(m, X, y).values())
    enum = bf_gap_enum(m, X, y)
    base = float(Wired(m).loss(X, y).detach())
    return {
        "gap/q vs first_order": rel(gap / q_small, fo),
        "first_order vs loop": rel(fo, mine),
        "gap vs own enumeration": rel(gap, enum),
        "own gap/q vs first_order": rel(enum / q_small, fo),
        # dropcheck sums prob·L over the 2^M masks, then subtracts L0: rounding
        # up to ~2^M ulps of L0 (the test's own enumeration sums prob·(L − L0)).
        "gap abs err": abs(gap - enum),
        "rounding bound": 4 * est.samples * U64 * (abs(base) + 1.0),
        "first_order": fo,
    }


def limit_ratio(model, X, y) -> tuple[float, float]:
    """``lim_{q→0} R_drop/R_taylor = first_order_gap / (R_taylor(unweighted)/2)``,
    computed with ``taylor_regularizer`` and (second route, valid where only
    softmax follows the site) with the unweighted ``explicit_regularizer``."""
    fo = dc.first_order_gap(model, X, y)
    t = float(dc.taylor_regularizer(model, X, y, weighted=False).detach())
    e = float(dc.explicit_regularizer(model, X, y, weighted=False).detach())
    return fo / (t / 2), fo / (e / 2)


def check_estimator_unbiased(model, X, y, estimator, *, calls=60, samples=8, seed=0, weighted=True, target=None,
                             key=None):
    """z-score of ``calls`` independent estimator values (each the mean of
    ``samples`` probes) against the exact value (the dense route unless given);
    ``key``: one site's value (``per_site=True``) instead of the total."""
    if target is None:
        ref = bf_explicit(model, X, y, weighted=weighted)
        target = sum(ref.values()) if key is None else ref[key]
    g = gen(seed)
    vals = []
    for _ in range(calls):
        v = dc.explicit_regularizer(model, X, y, estimator=estimator, samples=samples, generator=g, weighted=weighted,
                                    per_site=key is not None)
        vals.append(float((v if key is None else v[key]).detach()))
    return zscore(vals, target)


def fd_bias_ratio(model, X, y, eps, seed=3) -> tuple[float, float]:
    """``(fd(ε) − hutch)/(fd(ε/2) − hutch)`` with the same generator seed (hence
    the same Rademacher probe; ``per_site=True`` so fd probes one site at a time
    like hutchinson), summed over sites, and the relative size of the ε bias."""

    def tot(est, e=None):
        d = dc.explicit_regularizer(model, X, y, estimator=est, generator=seed, eps=e, per_site=True)
        return sum(float(v.detach()) for v in d.values())

    h, f1, f2 = tot("hutchinson"), tot("fd", eps), tot("fd", eps / 2)
    return (f1 - h) / (f2 - h), abs(f1 - h) / abs(h)


def check_noise_cov_exact(model, X, y) -> float:
    got = dc.implicit_noise_covariance(model, X, y)
    ref = bf_noise_cov(model, X, y)
    return float((got - ref).abs().max() / ref.abs().max())


def check_noise_cov_empirical(model, X, y, *, n=200, seed=0, noise="rademacher") -> dict:
    """z-scores of ``E⟨ξ, r⟩² = rᵀCr`` and ``E‖ξ‖² = tr C`` for ``dc.implicit_noise``
    samples vs the dense covariance (ξ has mean 0 exactly, so the sample mean of
    squares is unbiased), and of ``E⟨ξ, r⟩ = 0``."""
    C = bf_noise_cov(model, X, y)
    r = direction(C.shape[0], seed + 1)
    g = gen(seed)
    proj, sq, lin = [], [], []
    for _ in range(n):
        xi = flat(dc.implicit_noise(model, X, y, generator=g, noise=noise), model)
        proj.append(float(xi @ r) ** 2)
        sq.append(float(xi @ xi))
        lin.append(float(xi @ r))
    return {"proj": zscore(proj, float(r @ C @ r)), "trace": zscore(sq, float(C.trace())), "mean": zscore(lin, 0.0)}


def drop_moments_proj(model, X, y, r):
    mean, cov = bf_dropout_grad_moments(model, X, y)
    return float(mean @ r), float(r @ cov @ r), mean, cov


def check_dropout_k(model, X, y, k, *, n=150, seed=0, injected=False) -> float:
    """z-score of ``E⟨g_k − ḡ, r⟩² = rᵀ Cov(ξ_drop) r / k`` (``injected``:
    ``= rᵀ Cov r``, DROPOUT_1's), ``ḡ`` and ``Cov`` exact by enumeration."""
    mean, cov = bf_dropout_grad_moments(model, X, y)
    r = direction(mean.numel(), seed + 7)
    m0, v = float(mean @ r), float(r @ cov @ r)
    g = gen(seed)
    fn = dc.noise_injected_dropout_k_gradient if injected else dc.dropout_k_gradient
    vals = [(float(flat(fn(model, X, y, k, generator=g), model) @ r) - m0) ** 2 for _ in range(n)]
    return zscore(vals, v if injected else v / k)


def check_two_draw(model, X, y, *, n=150, seed=0) -> float:
    mean, cov = bf_dropout_grad_moments(model, X, y)
    r = direction(mean.numel(), seed + 7)
    g = gen(seed)
    vals = [float(flat(dc.two_draw_noise(model, X, y, generator=g), model) @ r) ** 2 for _ in range(n)]
    return zscore(vals, 2 * float(r @ cov @ r))
