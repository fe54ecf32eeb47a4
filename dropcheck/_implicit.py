"""The implicit regularization of dropout: its update noise and replacements.

Gradients are returned as ``{parameter name: tensor}`` over the model's
trainable parameters (or the ``params`` named), for the batch-mean loss.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._analytic import (
    SiteNames,
    fixed_eta_policy,
    noise_policy,
    sample_eta,
    site_generators,
    site_options,
    unlock_positions,
)
from ._common import (
    check_estimator,
    check_inputs,
    fd_eps,
    fd_step_and_tolerance,
    flatten_logits,
    grad_aware,
    mean_loss,
    named_params,
    site_weight_list,
)
from ._errors import DropcheckError
from ._precision import compute_dtype
from ._explicit import clean_forward, perturbed_logits, probe_forward

Grads = dict

_NOISES = ("rademacher", "bernoulli", "gaussian")


def _grads(loss: torch.Tensor, named, create_graph: bool = False) -> Grads:
    gs = torch.autograd.grad(
        loss, [p for _, p in named], create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return {n: g for (n, _), g in zip(named, gs)}


def _check_noise(noise: Optional[str]) -> None:
    if noise is not None and noise not in _NOISES:
        raise DropcheckError(f"unknown noise {noise!r}; expected one of {list(_NOISES)}")


@grad_aware
@site_options
def implicit_noise(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    estimator: str = "autograd",
    generator: Union[torch.Generator, int, None, Mapping] = None,
    eps: Optional[float] = None,
    noise: str = "rademacher",
    params: Optional[Sequence[str]] = None,
    site_weights: Optional[Mapping[str, float]] = None,
    independent_positions: bool = False,
    sites: Optional[SiteNames] = None,
) -> Grads:
    """One sample of the analytic update noise ``ξ_approx``, eqs. (4.5)-(4.6).

    ``ξ_approx = ∇_W Σ_i J_loss,i (η_i ⊙ h_i)`` with ``J_loss,i = ∂L/∂h_i``
    of the mean loss, the gradient taken through both ``J_loss,i`` and
    ``h_i``.  ``η_i`` follows the site's structure (one per sequence and unit
    for locked sites, one per weight for DropConnect) and, by default, is
    ``sqrt(q/(1-q))`` times Rademacher signs, the paper's choice (same
    covariance as dropout's ``η``); ``noise="bernoulli"``/``"gaussian"`` draw
    dropout's own ``η`` or Gaussian ``η``.

    ``estimator="autograd"``: double backward.  ``"fd"``:
    ``[∇_W L(h(1+εη)) - ∇_W L(h(1-εη))] / (2ε)``, first-order autograd only,
    error ``O(ε²)``; default ``ε = u^(1/3)`` with ``u`` the machine epsilon of
    the least precise dtype the model computes in (``compute_dtype``: a
    float32 RMSNorm inside a float64 model gives float32's 4.9e-3, not
    float64's 6.1e-6, whose rounding error would dominate).  The same
    ``generator`` state gives the same ``η`` in both.
    ``site_weights`` multiplies each site's ``η`` (keys: site keys or module
    names; default 1), e.g. per-group noise coefficients.
    ``independent_positions=True`` draws one ``η`` per position and unit at
    locked sites (the official code's choice) instead of one per sequence.

    ``sites`` (site names, occurrence keys ``"name#1"`` or ``SiteSpec``s;
    default all): the sites whose noise enters the sum of (4.5); the others
    are the identity, as if their ``q`` were 0 (no ``η``, no draw), so the
    result equals that of the model with their ``q`` set to 0.
    ``generator`` may map site names or keys to generators (or seeds): each
    site's ``η`` is then drawn from its own stream, the draws it would get in
    a call with that site alone (``SiteGenerators``), e.g. noise that is one
    draw for the whole batch from a generator seeded alike on every rank and
    per-sequence noise from a per-rank one.  Unknown names raise
    ``DropcheckError``.
    """
    check_estimator(estimator, ("autograd", "fd"))
    _check_noise(noise)
    named = named_params(model, params)
    gens = site_generators(generator)
    if estimator == "autograd":
        Z, y, occs = probe_forward(model, inputs, targets)
        if independent_positions:
            unlock_positions(occs)
        L = mean_loss(Z, y)
        gs = torch.autograd.grad(
            L, [o.delta for o in occs], create_graph=True, allow_unused=True, materialize_grads=True
        )
        ws = site_weight_list(occs, site_weights)
        s = Z.new_zeros(())
        for o, g, w in zip(occs, gs, ws):
            eta = w * sample_eta(o, gens(o), noise)
            s = s + (g * o.expand(eta) * o.h).sum()
        return _grads(s, named)
    Z, y, occs = clean_forward(model, inputs, targets)
    if independent_positions:
        unlock_positions(occs)
    # ε from the precision the model computes in (a float32 norm inside a float64 model: float32's);
    # a given ε must be one the dtype resolves
    eps = fd_step_and_tolerance(compute_dtype(model, inputs))[0] if eps is None else fd_eps(eps, Z.dtype)
    ws = site_weight_list(occs, site_weights)
    etas = [w * sample_eta(o, gens(o), noise) for o, w in zip(occs, ws)]
    out = []
    for sign in (1.0, -1.0):
        out.append(_grads(_loss(model, inputs, targets, fixed_eta_policy(etas, sign * eps)), named))
    return {n: (out[0][n] - out[1][n]) / (2.0 * eps) for n in out[0]}


def _loss(model, inputs, targets, policy) -> torch.Tensor:
    return mean_loss(*flatten_logits(perturbed_logits(model, inputs, policy), targets))


@grad_aware
@site_options
def implicit_noise_jacobian(
    model: nn.Module, inputs, targets: torch.Tensor, *, params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ξ_approx`` is linear in the noise: ``ξ = Σ_u η_u b_u`` with
    ``b_u = ∇_W (a_u · ∂L/∂h_i)``.  Returns ``(B, var)``: ``B`` of shape
    ``(U_total, P)`` (rows ``b_u`` over all sites' units, columns the
    flattened parameters in order) and ``var`` (``U_total``,) the noise
    variance ``q/(1-q)`` of each unit.  ``sites``: the sites that take part
    (rows of the others are left out, as if their ``q`` were 0)."""
    named = named_params(model, params)
    Z, y, occs = probe_forward(model, inputs, targets)
    L = mean_loss(Z, y)
    gs = torch.autograd.grad(
        L, [o.delta for o in occs], create_graph=True, allow_unused=True, materialize_grads=True
    )
    rows, var = [], []
    for o, g in zip(occs, gs):
        s = o.unit_sum(g * o.h).reshape(-1)  # s_u = a_u · ∂L/∂h
        U = s.numel()
        if not s.requires_grad:
            rows.append(Z.new_zeros(U, sum(p.numel() for _, p in named)))
        else:
            eye = torch.eye(U, dtype=s.dtype, device=s.device)
            gb = torch.autograd.grad(
                s,
                [p for _, p in named],
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            rows.append(torch.cat([t.reshape(U, -1) for t in gb], 1))
        var.append(torch.full((U,), o.site.variance, dtype=Z.dtype, device=Z.device))
    return torch.cat(rows, 0).detach(), torch.cat(var)


def implicit_noise_covariance(
    model: nn.Module, inputs, targets: torch.Tensor, *, params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> torch.Tensor:
    """Exact ``Cov(ξ_approx) = Σ_u Var(η_u) b_u b_uᵀ`` (4.6), shape ``(P, P)``
    over the flattened parameters.  It is also the covariance of dropout's
    gradient noise linearised in ``η`` (dropout's ``η`` has the same
    second moments as the scaled Rademacher one).  ``sites``: the sites that
    take part (the others as if their ``q`` were 0)."""
    B, var = implicit_noise_jacobian(model, inputs, targets, params=params, sites=sites)
    return B.T @ (var[:, None] * B)


@grad_aware
@site_options
def dropout_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    noise: Optional[str] = None,
    params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> Grads:
    """``∇_W L(F(x, η))`` for one dropout draw ``η`` (the site's own noise
    unless ``noise`` overrides it) from ``generator`` (one, or a mapping of
    site names or keys to generators: ``SiteGenerators``).  ``sites``: the
    sites that drop (the others as if their ``q`` were 0)."""
    _check_noise(noise)
    check_inputs(inputs)
    named = named_params(model, params)
    return _grads(_loss(model, inputs, targets, noise_policy(site_generators(generator), noise)), named)


@site_options
def dropout_k_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    k: int,
    *,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> Grads:
    """``DROPOUT_k`` gradient, Algorithm 1: ``(1/k) Σ_j ∇_W L(F(x, η_j))``
    over ``k`` independent draws, so ``Cov = Cov(ξ_drop)/k``.  ``generator``
    and ``sites`` as in ``dropout_gradient``."""
    if int(k) < 1:
        raise DropcheckError(f"k must be a positive integer, got {k!r}")
    gen = site_generators(generator)
    acc = None
    for _ in range(int(k)):
        g = dropout_gradient(model, inputs, targets, generator=gen, params=params)
        acc = g if acc is None else {n: acc[n] + g[n] for n in acc}
    return {n: v / int(k) for n, v in acc.items()}


@site_options
def two_draw_noise(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> Grads:
    """Two-draw noise ``ξ̃_drop = ∇_W L(F(x,η¹)) - ∇_W L(F(x,η²))`` (Section 3.1);
    ``Cov(ξ̃_drop) = 2 Cov(ξ_drop)``."""
    gen = site_generators(generator)
    g1 = dropout_gradient(model, inputs, targets, generator=gen, params=params)
    g2 = dropout_gradient(model, inputs, targets, generator=gen, params=params)
    return {n: g1[n] - g2[n] for n in g1}


@site_options
def noise_injected_dropout_k_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    k: int,
    *,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    params: Optional[Sequence[str]] = None,
    sites: Optional[SiteNames] = None,
) -> Grads:
    """Section 3.1's fix: ``DROPOUT_k`` gradient ``+ sqrt((1 - 1/k)/2) · ξ̃_drop``,
    whose covariance equals ``DROPOUT_1``'s: ``1/k + 2(1-1/k)/2 = 1``."""
    gen = site_generators(generator)
    gk = dropout_k_gradient(model, inputs, targets, k, generator=gen, params=params)
    xi = two_draw_noise(model, inputs, targets, generator=gen, params=params)
    c = math.sqrt((1.0 - 1.0 / int(k)) / 2.0)
    return {n: gk[n] + c * xi[n] for n in gk}
