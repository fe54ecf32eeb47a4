"""The explicit regularizer of dropout and its second-order references.

Notation (docs/math.md): logits ``Z`` of shape ``(N, c)`` over all positions,
``p = softmax(Z)``, ``H_out = diag(p) - ppᵀ``; a site occurrence has input
``h`` and noise units ``u`` (``mask_shape``); ``a_u = h ⊙ 1[positions of u]``
is the perturbation direction of unit ``u``, so dropout's perturbation is
``δ = Σ_u η_u a_u`` with ``E[η_u η_u'] = q/(1-q) · 1[u = u']``.

For a site the unweighted Gauss-Newton regularizer (4.3)-(4.4) is

    R_i = (1/N) Σ_n Σ_u (J_n a_u)ᵀ H_out,n (J_n a_u),      J_n = ∂z_n/∂h_i,

which is ``⟨J_iᵀ H_out J_i, diag(h_i²)⟩`` per example for per-position
dropout, gains the cross-time terms ``diag(h_t ⊙ h_s)`` for locked sites and
is ``⟨D²_W L_batch (Gauss-Newton), diag(W²)⟩`` for DropConnect.  The
dropout-matched penalty weights site ``i`` by ``λ_i = q_i/(2(1-q_i))``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._analytic import (
    Occurrence,
    SiteNames,
    analytic_mode,
    fixed_eta_policy,
    site_options,
    rademacher,
    site_generators,
    unlock_positions,
    zero_probe,
)
from ._common import (
    ESTIMATORS,
    call_model,
    check_estimator,
    check_inputs,
    fd_eps,
    fd_step_and_tolerance,
    flatten_logits,
    grad_aware,
    mean_loss,
    needs_graph,
    quad_form,
    select_rows,
    site_weight_list,
    with_stderr,
)
from ._errors import DropcheckError
from ._precision import compute_dtype

Value = Union[torch.Tensor, dict]

# Keep Jacobian chunks below this many elements (rows × numel(h)).
_CHUNK_ELEMS = 1 << 24


def probe_forward(model: nn.Module, inputs, targets):
    """Forward pass with a zero additive probe at every site occurrence.

    Returns ``(Z, y, occurrences)`` with ``Z`` of shape ``(N, c)``; each
    occurrence's ``delta`` is the probe, so ``autograd.grad(·, occ.delta)`` is
    the gradient in that site's input ``h``.
    """
    check_inputs(inputs)
    with analytic_mode(model, zero_probe) as session:
        logits = call_model(model, inputs)
    Z, y = flatten_logits(logits, targets)
    return Z, y, session.occurrences


def perturbed_logits(model: nn.Module, inputs, policy) -> torch.Tensor:
    """``model(inputs)`` with every site the identity plus ``policy``'s perturbation."""
    with analytic_mode(model, policy):
        return call_model(model, inputs)


def fd_pair(model: nn.Module, inputs, etas, eps: float, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at ``h(1 + εη)`` and ``h(1 - εη)`` (reshaped to ``shape``): the two
    passes of a central difference along the multiplicative probes ``etas``."""
    return tuple(
        select_rows(perturbed_logits(model, inputs, fixed_eta_policy(etas, s * eps)), shape[0]).reshape(shape)
        for s in (1.0, -1.0)
    )


def clean_forward(model: nn.Module, inputs, targets):
    """Forward pass with every site the identity (no probes): ``(Z, y, occurrences)``."""
    check_inputs(inputs)
    with analytic_mode(model, None) as session:
        logits = call_model(model, inputs)
    Z, y = flatten_logits(logits, targets)
    return Z, y, session.occurrences


def _finish(per_site: dict, occs: list[Occurrence], weighted: bool, return_per_site: bool, site_weights=None) -> Value:
    ws = site_weight_list(occs, site_weights)
    per_site = {k: v * w * (o.site.lam if weighted else 1.0) for (k, v), o, w in zip(per_site.items(), occs, ws)}
    if return_per_site:
        return per_site
    vals = list(per_site.values())
    return sum(vals[1:], vals[0])


def unit_jacobian(Z: torch.Tensor, occ: Occurrence, create_graph: bool) -> torch.Tensor:
    """``w[n, c, u] = (J_n a_u)_c``: the logits' derivative along every noise
    unit's direction, from the full Jacobian ``∂Z/∂h`` (reverse mode, batched
    over the ``N·c`` outputs, chunked to bound memory).  Shape ``(N, c, U)``."""
    N, c = Z.shape
    rows = N * c
    per_row = max(1, occ.h.numel())
    chunk = max(1, min(rows, _CHUNK_ELEMS // per_row))
    out = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        eye = torch.zeros(stop - start, rows, dtype=Z.dtype, device=Z.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        (J,) = torch.autograd.grad(
            Z,
            occ.delta,
            grad_outputs=eye.reshape(stop - start, N, c),
            is_grads_batched=True,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        out.append(occ.unit_sum(J * occ.h).reshape(stop - start, -1))
    return torch.cat(out, 0).reshape(N, c, -1)


@grad_aware
@site_options
def explicit_regularizer(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    estimator: str = "exact",
    samples: int = 1,
    weighted: bool = True,
    hessian: str = "output",
    generator: Union[torch.Generator, int, None, Mapping] = None,
    eps: Optional[float] = None,
    per_site: bool = False,
    site_weights: Optional[Mapping[str, float]] = None,
    independent_positions: bool = False,
    sites: Optional[SiteNames] = None,
    return_stderr: bool = False,
) -> Value:
    """Explicit regularizer ``R_approx`` of dropout, eqs. (4.3)-(4.4).

    ``Σ_i λ_i ⟨J_iᵀ H_out J_i, diag(h_i²)⟩`` averaged over examples (over all
    positions of a sequence model), with each site's own noise structure
    (module docstring).  ``weighted=True`` applies ``λ_i = q_i/(2(1-q_i))``
    (the constant that matches dropout to second order, (4.2)); ``False``
    gives the bare inner products.

    Estimators (all unbiased for the same value; docs/math.md "Estimators"):

    - ``"exact"``: from the full Jacobian ``∂Z/∂h_i``; cost grows with
      ``N·c`` backward passes, for small models and verification.
    - ``"sampled"``: labels ``y' ~ p`` per position; ``g = ∂Σ_n ℓ(z_n, y'_n)/∂h``;
      ``(1/N) Σ_u (g·a_u)²`` (the official code's ``jreg_sample_logit``).
      Its value is unbiased; its parameter gradient omits the dependence of
      the label distribution on the parameters (as the official code does).
    - ``"hutchinson"``: Rademacher ``v`` per unit, ``u = J(v ⊙ h)`` by a
      Jacobian-vector product, ``(1/N) Σ_n u_nᵀ H_out u_n``.
    - ``"fd"``: the same ``u`` by a central difference of two forward passes
      with multiplicative probes ``h(1 ± ε √λ_i v_i)`` at all sites at once
      (first-order autograd only); bias ``O(ε²)``; default ``ε`` from the
      precision the model computes in (``_precision.compute_dtype``).

    ``samples`` averages that many draws (ignored by ``"exact"``).
    ``hessian="identity"`` is the Section 5.2 ablation (``H_out`` replaced by
    ``I/c``).  ``site_weights`` multiplies sites' terms (keys: site keys or
    module names; default 1), e.g. per-group coefficients.
    ``independent_positions=True`` treats locked sites as per-position
    (dropping their cross-time terms), as the official code does.

    ``sites`` (site names, occurrence keys ``"name#1"`` or ``SiteSpec``s;
    default all) are the sites that take part: the others are the identity,
    as if their ``q`` were 0 (no term, no probe, no draw), so the value and
    the draws of the rest equal those of the model with the others' ``q``
    set to 0.  ``generator``: a ``torch.Generator``, a seed, or a mapping
    ``{site name or key: generator or seed}`` giving each site's probes
    (``"hutchinson"``, ``"fd"``) a stream of its own (``SiteGenerators``);
    ``"sampled"`` draws labels shared by all sites and needs one generator.
    Unknown names in ``sites`` or in the mapping raise ``DropcheckError``.

    Returns a scalar tensor, differentiable in the parameters so it can be
    added to a loss; ``per_site=True`` returns ``{site key: value}``.
    ``return_stderr=True`` (stochastic estimators, ``samples >= 2``) returns
    an ``Estimate`` ``(value, stderr)`` instead (per site with
    ``per_site``): the standard error of the mean over the ``samples`` draws.
    """
    check_estimator(estimator, ESTIMATORS)
    if hessian not in ("output", "identity"):
        raise DropcheckError(f"unknown hessian {hessian!r}; expected 'output' or 'identity'")
    if int(samples) < 1:
        raise DropcheckError(f"samples must be >= 1, got {samples!r}")
    samples = int(samples)
    cg = needs_graph(model)

    if return_stderr and estimator == "exact":
        raise DropcheckError("return_stderr: the exact estimator has no sampling error; use a stochastic one")
    if estimator == "fd":
        return _fd(model, inputs, targets, samples, weighted, hessian, generator, eps, per_site, site_weights,
                   independent_positions, return_stderr)

    Z, y, occs = probe_forward(model, inputs, targets)
    if independent_positions:
        unlock_positions(occs)
    N, c = Z.shape
    p = torch.softmax(Z, -1)
    per: dict[str, torch.Tensor] = {}

    if estimator == "exact":
        for o in occs:
            w = unit_jacobian(Z, o, cg)
            per[o.key] = quad_form(p, w, hessian).sum(-1).mean()
        return _finish(per, occs, weighted, per_site, site_weights)

    gens = site_generators(generator)
    probes = [o.delta for o in occs]
    acc = [Z.new_zeros(()) for _ in occs]
    draws = []  # per draw, per site (detached): the standard error's data
    if estimator == "sampled":
        for _ in range(samples):
            row = []
            gen = gens.one("estimator 'sampled' (its labels y' ~ p)")
            if hessian == "output":
                yp = torch.multinomial(p.detach().to(gen.device), 1, generator=gen).squeeze(1).to(Z.device)
                surrogate = F.cross_entropy(Z, yp, reduction="sum")
            else:  # E[r rᵀ] = I/c
                r = rademacher(Z.shape, Z, gen) / math.sqrt(c)
                surrogate = (r * Z).sum()
            gs = torch.autograd.grad(
                surrogate, probes, retain_graph=True, create_graph=cg, allow_unused=True, materialize_grads=True
            )
            for j, (o, g) in enumerate(zip(occs, gs)):
                t = (o.unit_sum(g * o.h) ** 2).sum() / N
                acc[j] = acc[j] + t
                row.append(float(t.detach()))
            draws.append(row)
    else:  # hutchinson: u = J d by the double-vjp trick (linear in the dummy w)
        wdummy = torch.zeros_like(Z, requires_grad=True)
        gs = torch.autograd.grad(
            Z, probes, grad_outputs=wdummy, create_graph=True, allow_unused=True, materialize_grads=True
        )
        for _ in range(samples):
            row = []
            for j, (o, g) in enumerate(zip(occs, gs)):
                d = o.expand(rademacher(o.mask_shape, o.h, gens(o))) * o.h
                if not g.requires_grad:  # site does not reach the logits
                    row.append(0.0)
                    continue
                (u,) = torch.autograd.grad(g, wdummy, grad_outputs=d, retain_graph=True, create_graph=cg)
                t = quad_form(p, u, hessian).mean()
                acc[j] = acc[j] + t
                row.append(float(t.detach()))
            draws.append(row)
    per = {o.key: a / samples for o, a in zip(occs, acc)}
    out = _finish(per, occs, weighted, per_site, site_weights)
    if not return_stderr:
        return out
    ws = site_weight_list(occs, site_weights)
    factors = [w * (o.site.lam if weighted else 1.0) for o, w in zip(occs, ws)]
    return with_stderr(out, draws, factors, samples, per_site, [o.key for o in occs])


def _fd(model, inputs, targets, samples, weighted, hessian, generator, eps, per_site, site_weights,
        independent_positions=False, return_stderr=False):
    Z, y, occs = clean_forward(model, inputs, targets)
    if independent_positions:
        unlock_positions(occs)
    ws = site_weight_list(occs, site_weights)
    p = torch.softmax(Z, -1)
    # ε from the precision the model computes in; a given ε must be one the dtype resolves
    eps = fd_step_and_tolerance(compute_dtype(model, inputs))[0] if eps is None else fd_eps(eps, Z.dtype)
    if not eps > 0:
        raise DropcheckError(f"eps must be > 0, got {eps!r}")
    gens = site_generators(generator)
    groups = [[j] for j in range(len(occs))] if per_site else [list(range(len(occs)))]
    acc = [Z.new_zeros(()) for _ in groups]
    draws = []
    for _ in range(samples):
        row = []
        vs = [rademacher(o.mask_shape, o.h, gens(o)) for o in occs]
        for gi, group in enumerate(groups):
            etas = [None] * len(occs)
            for j in group:
                scale = math.sqrt((occs[j].site.lam if weighted else 1.0) * ws[j])
                etas[j] = scale * vs[j]
            zp, zm = fd_pair(model, inputs, etas, eps, Z.shape)
            u = (zp - zm) / (2.0 * eps)
            t = quad_form(p, u, hessian).mean()
            acc[gi] = acc[gi] + t
            row.append(float(t.detach()))
        draws.append(row)
    acc = [a / samples for a in acc]
    out = {o.key: a for o, a in zip(occs, acc)} if per_site else acc[0]
    if not return_stderr:
        return out
    # the probes already carry λ_i and the site weights
    return with_stderr(out, draws, [1.0] * len(groups), samples, per_site, [o.key for o in occs])


@grad_aware
@site_options
def loss_jacobian_regularizer(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    weighted: bool = True,
    per_site: bool = False,
    site_weights: Optional[Mapping[str, float]] = None,
    sites: Optional[SiteNames] = None,
) -> Value:
    """Loss-Jacobian ablation ``R̃_approx`` of eq. (5.1).

    ``Σ_i λ_i J_loss,i diag(h_i²) J_loss,iᵀ`` with the true labels: per site
    ``(1/N) Σ_u (a_u · ∂(Σ_n ℓ(z_n, y_n))/∂h_i)²`` (for per-example models
    exactly the per-example ``Σ_k h_k² (∂ℓ/∂h_k)²`` averaged).  Unlike
    ``R_approx`` it is not an expectation over labels, so it is not PSD in
    ``H_out`` and does not match dropout (Section 5.2).  ``sites``: the
    sites that take part (the others as if their ``q`` were 0; see
    ``explicit_regularizer``).
    """
    Z, y, occs = probe_forward(model, inputs, targets)
    N = Z.shape[0]
    total = F.cross_entropy(Z, y, reduction="sum")
    gs = torch.autograd.grad(
        total,
        [o.delta for o in occs],
        create_graph=needs_graph(model),
        allow_unused=True,
        materialize_grads=True,
    )
    per = {o.key: (o.unit_sum(g * o.h) ** 2).sum() / N for o, g in zip(occs, gs)}
    return _finish(per, occs, weighted, per_site, site_weights)


@grad_aware
@site_options
def taylor_regularizer(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    weighted: bool = True,
    estimator: str = "exact",
    samples: int = 1,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    per_site: bool = False,
    sites: Optional[SiteNames] = None,
    return_stderr: bool = False,
) -> Value:
    """Second-order Taylor term of the dropout gap, eq. (4.2), model Hessian included.

    ``R_taylor = Σ_i λ_i Σ_u a_uᵀ D²_{h_i}(L) a_u`` with ``L`` the mean loss
    and ``D²`` the *full* Hessian in the site's input (Gauss-Newton part
    ``JᵀH_out J`` plus ``Σ_c ∂ℓ/∂z_c D²F_c``); cross-site terms vanish since
    masks of different sites are independent.  Computed by Hessian-vector
    products: ``"exact"`` along every unit direction ``a_u`` (cost ∝ units),
    ``"hutchinson"`` along ``Σ_u v_u a_u`` with Rademacher ``v``.
    Equals the weighted ``R_approx`` exactly where only the softmax follows
    every site.  ``sites`` and per-site ``generator`` mappings as in
    ``explicit_regularizer``; ``return_stderr`` (``"hutchinson"``) as there.
    """
    check_estimator(estimator, ("exact", "hutchinson"))
    if return_stderr and estimator == "exact":
        raise DropcheckError("return_stderr: the exact estimator has no sampling error; use 'hutchinson'")
    cg = needs_graph(model)
    Z, y, occs = probe_forward(model, inputs, targets)
    L = mean_loss(Z, y)
    gs = torch.autograd.grad(
        L, [o.delta for o in occs], create_graph=True, allow_unused=True, materialize_grads=True
    )
    per: dict[str, torch.Tensor] = {}
    gens = site_generators(generator) if estimator == "hutchinson" else None
    cols = []  # per site, per draw (hutchinson): the standard error's data
    for o, g in zip(occs, gs):
        if not g.requires_grad:
            per[o.key] = Z.new_zeros(())
            cols.append([0.0] * int(samples))
            continue
        if estimator == "exact":
            U = o.units
            chunk = max(1, min(U, _CHUNK_ELEMS // max(1, o.h.numel())))
            total = Z.new_zeros(())
            for start in range(0, U, chunk):
                stop = min(U, start + chunk)
                basis = torch.zeros(stop - start, U, dtype=o.h.dtype, device=o.h.device)
                basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                A = basis.reshape(stop - start, *o.mask_shape).expand(stop - start, *o.h.shape) * o.h
                (Hv,) = torch.autograd.grad(
                    g, o.delta, grad_outputs=A, is_grads_batched=True, retain_graph=True, create_graph=cg
                )
                total = total + (Hv * A).sum()
            per[o.key] = total
        else:
            total = Z.new_zeros(())
            col = []
            for _ in range(int(samples)):
                d = o.expand(rademacher(o.mask_shape, o.h, gens(o))) * o.h
                (Hv,) = torch.autograd.grad(g, o.delta, grad_outputs=d, retain_graph=True, create_graph=cg)
                t = (Hv * d).sum()
                total = total + t
                col.append(float(t.detach()))
            cols.append(col)
            per[o.key] = total / int(samples)
    out = _finish(per, occs, weighted, per_site)
    if not return_stderr:
        return out
    factors = [o.site.lam if weighted else 1.0 for o in occs]
    draws = [list(r) for r in zip(*cols)]
    return with_stderr(out, draws, factors, int(samples), per_site, [o.key for o in occs])
