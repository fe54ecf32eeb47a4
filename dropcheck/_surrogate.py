"""Algorithm 2 in one backward pass: a surrogate whose gradient is the update.

``analytic_dropout_objective`` runs three forward passes (clean, and
multiplicative probes ``h(1 ± ε√λ_i v_i)`` with one Rademacher ``v_i`` per
noise unit, shared by both terms) and returns a scalar ``S`` with

    ∇_W S = ∇_W [L + a·R̂_approx] + b·ξ̂_approx,

``R̂_approx`` the finite-difference estimate of the λ-weighted explicit
regularizer (4.4) and ``ξ̂_approx`` the finite-difference analytic noise
(4.5)-(4.6) with ``η_i = sqrt(q_i/(1-q_i)) v_i`` (the paper's scaled
Rademacher law).  Only first-order autograd is needed, so it runs through
fused kernels (cuDNN RNNs) that have no double backward.  Sharing the probe
costs no bias: ``R̂`` is quadratic and ``ξ̂`` linear in ``v``, so their
fluctuations are uncorrelated for symmetric ``v``.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from ._analytic import as_generator, rademacher, unlock_positions
from ._common import default_eps, mean_loss, quad_form, site_weight_list
from ._errors import DropcheckError
from ._explicit import clean_forward, fd_pair


class AnalyticObjective(NamedTuple):
    """``objective``: differentiate it for the Algorithm 2 update;
    ``loss``: the clean mean loss; ``explicit``: the ``R̂_approx`` sample
    (λ-weighted, before ``explicit_weight``); ``implicit_probe``: the
    zero-mean term whose gradient is ``ξ̂_approx`` (its value is noise)."""

    objective: torch.Tensor
    loss: torch.Tensor
    explicit: torch.Tensor
    implicit_probe: torch.Tensor


def analytic_dropout_objective(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    explicit_weight: float = 1.0,
    implicit_weight: float = 1.0,
    hessian: str = "output",
    generator: Union[torch.Generator, int, None] = None,
    eps: Optional[float] = None,
    site_weights: Optional[Mapping[str, float]] = None,
    independent_positions: bool = False,
) -> AnalyticObjective:
    """Surrogate of Algorithm 2 (``L + λ₁R_approx`` plus ``λ₂ξ_approx``) by
    finite differences; see the module docstring.  ``explicit_weight`` and
    ``implicit_weight`` multiply the derived defaults (λ_i per site, and the
    noise with variance ``q/(1-q)``); 0 switches a term off (its passes are
    still run when the other needs them).  ``site_weights`` ``w_i`` multiply
    the sites' explicit terms (probe scale ``sqrt(λ_i w_i)``); since both
    terms share the probe, site ``i``'s noise is then scaled by ``sqrt(w_i)``
    (use ``explicit_regularizer`` + ``implicit_noise`` for independent
    per-site coefficients).  ``independent_positions=True`` draws one probe
    per position and unit at locked sites (the official code's per-position
    treatment of locked dropout) instead of one per sequence.  Bias ``O(ε²)``."""
    if hessian not in ("output", "identity"):
        raise DropcheckError(f"unknown hessian {hessian!r}; expected 'output' or 'identity'")
    Z0, y, occs = clean_forward(model, inputs, targets)
    if independent_positions:
        unlock_positions(occs)
    loss = mean_loss(Z0, y)
    eps = default_eps(Z0.dtype) if eps is None else float(eps)
    if not eps > 0:
        raise DropcheckError(f"eps must be > 0, got {eps!r}")
    if explicit_weight == 0 and implicit_weight == 0:
        zero = loss.new_zeros(())
        return AnalyticObjective(loss, loss, zero, zero)
    gen = as_generator(generator)
    ws = site_weight_list(occs, site_weights)
    etas = [math.sqrt(o.site.lam * w) * rademacher(o.mask_shape, o.h, gen) for o, w in zip(occs, ws)]
    zs = fd_pair(model, inputs, etas, eps, Z0.shape)
    u = (zs[0] - zs[1]) / (2.0 * eps)
    explicit = quad_form(torch.softmax(Z0, -1), u, hessian).mean()
    # the probes are h(1 ± ε' η) with η = sqrt(2λ) v and ε' = ε/√2
    implicit = math.sqrt(2.0) * (mean_loss(zs[0], y) - mean_loss(zs[1], y)) / (2.0 * eps)
    objective = loss + explicit_weight * explicit + implicit_weight * implicit
    return AnalyticObjective(objective, loss, explicit, implicit)
