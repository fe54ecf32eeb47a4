"""The exact dropout gap ``R_drop`` and its first-order limit in ``q``."""

from __future__ import annotations

import itertools
import math
from typing import Optional, Union

import torch
from torch import nn

from ._analytic import analytic_mode, as_generator, fixed_eta_policy, noise_policy
from ._common import call_model, check_inputs, flatten_logits, grad_aware, mean_loss
from ._errors import DropcheckError
from ._explicit import clean_forward, probe_forward
from ._sites import BERNOULLI


class GapEstimate(tuple):
    """``(value, stderr)``, so ``r, se = dc.dropout_gap(...)`` unpacks as
    DESIGN.md promises; ``stderr`` is 0 when exact.  ``.samples``: the noise
    draws (the number of masks enumerated when exact)."""

    def __new__(cls, value: float, stderr: float, samples: int):
        obj = super().__new__(cls, (float(value), float(stderr)))
        obj.samples = int(samples)
        return obj

    @property
    def value(self) -> float:
        return self[0]

    @property
    def stderr(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"GapEstimate(value={self[0]!r}, stderr={self[1]!r}, samples={self.samples})"

    def __reduce__(self):
        return (GapEstimate, (self[0], self[1], self.samples))


@torch.no_grad()
def dropout_gap(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    samples: int = 1000,
    exact: bool = False,
    generator: Union[torch.Generator, int, None] = None,
    noise: Optional[str] = None,
    antithetic: bool = False,
    control_variate: bool = False,
    max_units: int = 16,
) -> GapEstimate:
    """Dropout gap ``R_drop = E_η[L(F(x, η))] - L(F(x))`` (Section 4, (4.1)).

    ``L`` is the mean loss over the batch with every site's own noise
    structure (per position, locked over time, or one DropConnect mask per
    pass).  Monte Carlo over ``samples`` draws from ``generator`` with the
    standard error of the mean; ``antithetic=True`` pairs every draw ``η``
    with ``-η`` (valid for symmetric noise only: ``noise="gaussian"`` or
    Gaussian sites), which removes the O(√q) first-order fluctuation;
    ``control_variate=True`` subtracts the first-order term ``Σ_i ∂L/∂h_i ·
    (η_i ⊙ h_i)`` (clean-point gradient, mean zero for any noise), which
    does the same for Bernoulli noise.
    ``exact=True`` enumerates all ``2^M`` keep/drop patterns of the ``M``
    noise units (Bernoulli sites only, ``M <= max_units``) and weights each
    by its probability.  ``noise`` overrides every site's distribution
    (``"bernoulli"`` or ``"gaussian"``, same variance ``q/(1-q)``).
    """
    check_inputs(inputs)
    Z, y, occs = clean_forward(model, inputs, targets)
    base = mean_loss(Z, y)
    if exact:
        kinds = {noise or o.site.noise for o in occs}
        if kinds != {BERNOULLI}:
            raise DropcheckError(
                f"exact enumeration needs Bernoulli noise at every site, got {sorted(kinds)}; "
                "use Monte Carlo (exact=False) for Gaussian noise"
            )
        M = sum(o.units for o in occs)
        if M > max_units:
            raise DropcheckError(
                f"exact enumeration over {M} noise units (2^{M} masks) exceeds max_units={max_units}; "
                "use Monte Carlo or raise max_units"
            )
        total = base.new_zeros(())
        with analytic_mode(model) as sess:
            for bits in itertools.product((0, 1), repeat=M):  # 1 = dropped
                etas, prob, pos = [], 1.0, 0
                for o in occs:
                    b = torch.tensor(bits[pos : pos + o.units], dtype=base.dtype, device=base.device)
                    pos += o.units
                    q = o.site.q
                    nd = float(b.sum())
                    prob *= q**nd * (1.0 - q) ** (o.units - nd)
                    # η in the model's dtype: a float32 q/(1-q) biased float64 gaps by up to 3e-6
                    eta = torch.where(b > 0, torch.full_like(b, -1.0), torch.full_like(b, q / (1.0 - q)))
                    etas.append(eta.reshape(o.mask_shape))
                sess.reset(fixed_eta_policy(etas))
                total = total + prob * mean_loss(*flatten_logits(call_model(model, inputs), targets))
        return GapEstimate(float(total - base), 0.0, 2**M)

    if noise is not None and noise not in ("bernoulli", "gaussian"):
        raise DropcheckError(f"unknown noise {noise!r}; expected 'bernoulli' or 'gaussian'")
    if antithetic and not all((noise or o.site.noise) == "gaussian" for o in occs):
        raise DropcheckError("antithetic sampling needs symmetric (Gaussian) noise at every site")
    if int(samples) < 2:
        raise DropcheckError(f"Monte Carlo needs samples >= 2, got {samples!r}")
    gen = as_generator(generator)
    if control_variate:
        with torch.enable_grad():
            Zp, _, pocc = probe_forward(model, inputs, targets)
            gs = torch.autograd.grad(
                mean_loss(Zp, y), [o.delta for o in pocc], allow_unused=True, materialize_grads=True
            )
        cv = [(g * o.h).detach() for g, o in zip(gs, pocc)]
    vals = []
    with analytic_mode(model) as s:  # entered once: hooks stay, the policy changes

        def loss(policy):
            s.reset(policy)
            return mean_loss(*flatten_logits(call_model(model, inputs), targets))

        for _ in range(int(samples)):
            lv = loss(noise_policy(gen, noise))
            if control_variate:
                lin = sum((c * o.expand(o.extra["eta"])).sum() for c, o in zip(cv, s.occurrences))
                vals.append(lv - lin)
            elif antithetic:  # replay the same draw with the opposite sign
                etas = [o.extra["eta"] for o in s.occurrences]
                vals.append(0.5 * (lv + loss(fixed_eta_policy(etas, -1.0))))
            else:
                vals.append(lv)
    v = torch.stack(vals) - base
    return GapEstimate(float(v.mean()), float(v.std(unbiased=True) / math.sqrt(len(vals))), len(vals))


@grad_aware
def first_order_gap(model: nn.Module, inputs, targets: torch.Tensor, *, per_site: bool = False):
    """``lim_{q→0} R_drop/q = Σ_i Σ_u Δ_iu`` (MATH.md, "When the second-order picture holds").

    ``Δ_iu = L(unit u of site i zeroed) - L + a_u · ∂L/∂h_i``: the deletion of
    one noise unit (every position it covers: a whole feature over time for
    locked sites, one weight for DropConnect) minus its linear prediction.
    Its quadratic part is ``½ a_uᵀ D²L a_u``, i.e. the unweighted
    ``taylor_regularizer`` / 2; the two agree only when each unit's deletion
    is small (wide layers).  One forward pass per unit.  Returns a float (or
    ``{site key: float}``).
    """
    Z, y, occs = probe_forward(model, inputs, targets)
    L = mean_loss(Z, y)
    gs = torch.autograd.grad(L, [o.delta for o in occs], allow_unused=True, materialize_grads=True)
    base = float(L.detach())
    out: dict[str, float] = {}
    with torch.no_grad(), analytic_mode(model) as sess:
        for j, (o, g) in enumerate(zip(occs, gs)):
            lin = o.unit_sum(g * o.h).reshape(-1)
            total = 0.0
            for u in range(o.units):
                eta = torch.zeros(o.units, dtype=Z.dtype, device=Z.device)
                eta[u] = -1.0
                etas = [None] * len(occs)
                etas[j] = eta.reshape(o.mask_shape)
                sess.reset(fixed_eta_policy(etas))
                Lu = float(mean_loss(*flatten_logits(call_model(model, inputs), targets)))
                total += Lu - base + float(lin[u])
            out[o.key] = total
    return out if per_site else sum(out.values())
