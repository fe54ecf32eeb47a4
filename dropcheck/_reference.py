"""Brute-force dense references (route B of ``dropcheck verify``).

These build the full matrices that the estimators avoid: the dense Jacobian
``∂Z/∂h`` and Hessian ``∂²L/∂h²`` of one site occurrence by ``torch.func``
(``jacrev`` / ``hessian`` of a function of an explicit probe), and the dense
second-moment matrix ``C = E[δδᵀ]/Var(η)`` of the site's noise structure
(``C[a, b] = h_a h_b · 1[a and b share a noise unit]``: diagonal for
per-position dropout, cross-time blocks for locked sites).  They cost
``O(numel(h)²)`` memory: small models only.
"""

from __future__ import annotations

import torch
from torch import nn

from ._analytic import Occurrence, analytic_mode
from ._common import call_model, flatten_logits, mean_loss
from ._explicit import clean_forward


def noise_second_moment(occ: Occurrence) -> torch.Tensor:
    """Dense ``C`` of shape ``(D, D)``, ``D = numel(h)``: ``E[δδᵀ] = Var(η) · C``."""
    units = torch.arange(occ.units, device=occ.h.device).reshape(occ.mask_shape)
    units = units.expand(occ.h.shape).reshape(-1)
    h = occ.h.detach().reshape(-1)
    same = (units[:, None] == units[None, :]).to(h.dtype)
    return same * h[:, None] * h[None, :]


def half_second_moment_of_eta(occ: Occurrence) -> float:
    """``½ E[η²]`` computed from the noise law itself (not from ``SiteSpec.lam``):
    Bernoulli ``η ∈ {-1, q/(1-q)}`` with probabilities ``{q, 1-q}``; Gaussian
    sites are defined by their variance ``q/(1-q)``."""
    q = occ.site.q
    if occ.site.noise == "gaussian":
        return 0.5 * q / (1.0 - q)
    return 0.5 * (q * (-1.0) ** 2 + (1.0 - q) * (q / (1.0 - q)) ** 2)


def _probe_fn(model: nn.Module, inputs, targets, j: int):
    """``probe ↦ logits (N, c)`` with ``probe`` added at occurrence ``j`` only."""

    def f(probe):
        counter = iter(range(10**9))

        def policy(occ):
            return probe if next(counter) == j else None

        with analytic_mode(model, policy):
            logits = call_model(model, inputs)
        return flatten_logits(logits, targets)[0]

    return f


def dense_explicit(model: nn.Module, inputs, targets, *, weighted: bool = True) -> dict:
    """``R_approx`` per occurrence as ``(1/N) Σ_n tr(J_nᵀ H_out,n J_n C)`` with
    dense matrices.  Returns ``{site key: float}``."""
    with torch.no_grad():
        Z, y, occs = clean_forward(model, inputs, targets)
    p = torch.softmax(Z, -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    out = {}
    for j, o in enumerate(occs):
        J = torch.func.jacrev(_probe_fn(model, inputs, targets, j))(torch.zeros_like(o.h))
        N, c = Z.shape
        J = J.reshape(N, c, -1).detach()
        C = noise_second_moment(o)
        M = torch.einsum("nad,de,nbe->nab", J, C, J)
        val = float((H * M).sum((1, 2)).mean())
        out[o.key] = val * (half_second_moment_of_eta(o) if weighted else 1.0)
    return out


def dense_taylor(model: nn.Module, inputs, targets, *, weighted: bool = True) -> dict:
    """``R_taylor`` per occurrence as ``tr(∇²_h L · C)`` with the dense
    Hessian of the mean loss.  Returns ``{site key: float}``."""
    with torch.no_grad():
        Z, y, occs = clean_forward(model, inputs, targets)
    out = {}
    for j, o in enumerate(occs):
        f = _probe_fn(model, inputs, targets, j)
        Hs = torch.func.hessian(lambda d: mean_loss(f(d), y))(torch.zeros_like(o.h))
        D = o.h.numel()
        val = float((Hs.reshape(D, D).detach() * noise_second_moment(o)).sum())
        out[o.key] = val * (half_second_moment_of_eta(o) if weighted else 1.0)
    return out
