"""The exact dropout gap ``R_drop`` and its first-order limit in ``q``."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._analytic import SiteNames, analytic_mode, fixed_eta_policy, noise_policy, site_generators, site_options
from ._common import call_model, check_inputs, flatten_logits, grad_aware, mean_loss, select_rows
from ._errors import DropcheckError
from ._explicit import clean_forward, probe_forward
from ._sites import BERNOULLI


class GapEstimate(tuple):
    """``(value, stderr)``, so ``r, se = dc.dropout_gap(...)`` unpacks as
    docs/design.md promises; ``stderr`` is 0 when exact.  ``.samples``: the noise
    draws (the number of masks enumerated when exact)."""

    def __new__(cls, value: float, stderr: float, samples: int):
        obj = super().__new__(cls, (float(value), float(stderr)))
        obj.samples = int(samples)
        obj.control_variate = False  # whether the first-order control variate was subtracted
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
@site_options
def dropout_gap(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    samples: int = 1000,
    exact: bool = False,
    generator: Union[torch.Generator, int, None, Mapping] = None,
    noise: Optional[str] = None,
    antithetic: bool = False,
    control_variate: Union[bool, str] = False,
    max_units: int = 16,
    sites: Optional[SiteNames] = None,
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
    does the same for Bernoulli noise.  It narrows the error bar only where
    that linear term predicts most of each draw's loss change (small
    effective deletions: convnets, MLPs, small ``q``); where single
    deletions move the loss far from its linear prediction (attention
    probabilities, narrow transformer layers at ``q ≈ 0.1-0.3``) it can
    widen it several-fold (docs/testing.md, "Error bars").
    ``control_variate="auto"`` decides from a pilot of 32 extra draws (not
    part of the estimate): the form with the smaller sample variance is used
    for the ``samples`` draws; ``GapEstimate.control_variate`` says which.
    ``exact=True`` enumerates the keep/drop patterns of the noise units
    (Bernoulli sites only) and weights each by its probability, factorized
    over independent groups: units that reach disjoint sets of output
    positions (examples under per-position dropout, sequences under locked
    dropout) are enumerated separately, and the groups' masks share forward
    passes, so a 12-example batch with 5 units per example costs 2⁵ passes,
    not 2⁶⁰ (``_enumerated_gap``).  ``max_units`` bounds the largest group.  ``noise`` overrides every site's distribution
    (``"bernoulli"`` or ``"gaussian"``, same variance ``q/(1-q)``).

    ``sites`` (site names, occurrence keys or ``SiteSpec``s; default all):
    the sites that drop; the others are the identity, as if their ``q`` were
    0.  ``generator`` may map site names or keys to generators (or seeds),
    each site's masks then come from its own stream (``SiteGenerators``).
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
        value, masks = _enumerated_gap(model, inputs, targets, Z, y, occs, int(max_units))
        return GapEstimate(value, 0.0, masks)

    if noise is not None and noise not in ("bernoulli", "gaussian"):
        raise DropcheckError(f"unknown noise {noise!r}; expected 'bernoulli' or 'gaussian'")
    if antithetic and not all((noise or o.site.noise) == "gaussian" for o in occs):
        raise DropcheckError("antithetic sampling needs symmetric (Gaussian) noise at every site")
    if int(samples) < 2:
        raise DropcheckError(f"Monte Carlo needs samples >= 2, got {samples!r}")
    gen = site_generators(generator)
    if control_variate not in (True, False, "auto"):
        raise DropcheckError(f"control_variate must be True, False or 'auto', got {control_variate!r}")
    auto = control_variate == "auto"
    if auto and antithetic:
        raise DropcheckError("control_variate='auto' and antithetic=True: choose one")
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

        if auto:  # pilot: both forms on the same 32 draws, the smaller variance wins
            raw, adj = [], []
            for _ in range(32):
                lv = loss(noise_policy(gen, noise))
                raw.append(lv)
                adj.append(lv - sum((c * o.expand(o.extra["eta"])).sum() for c, o in zip(cv, s.occurrences)))
            control_variate = bool(torch.stack(adj).var() < torch.stack(raw).var())
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
    out = GapEstimate(float(v.mean()), float(v.std(unbiased=True) / math.sqrt(len(vals))), len(vals))
    out.control_variate = bool(control_variate)
    return out


@grad_aware
@site_options
def first_order_gap(model: nn.Module, inputs, targets: torch.Tensor, *, per_site: bool = False,
                    sites: Optional[SiteNames] = None):
    """``lim_{q→0} R_drop/q = Σ_i Σ_u Δ_iu`` (docs/math.md, "When the second-order picture holds").

    ``Δ_iu = L(unit u of site i zeroed) - L + a_u · ∂L/∂h_i``: the deletion of
    one noise unit (every position it covers: a whole feature over time for
    locked sites, one weight for DropConnect) minus its linear prediction.
    Its quadratic part is ``½ a_uᵀ D²L a_u``, i.e. the unweighted
    ``taylor_regularizer`` / 2; the two agree only when each unit's deletion
    is small (wide layers).  One forward pass per unit.  Returns a float (or
    ``{site key: float}``).  ``sites``: the sites that take part (the
    others as if their ``q`` were 0).
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


def _unit_positions(occs) -> list[tuple[int, int]]:
    """``(occurrence, flat unit index)`` of every noise unit.  (A unit whose
    input is zero at the clean point is kept: upstream drops can make it
    non-zero.)"""
    return [(j, u) for j, o in enumerate(occs) for u in range(o.units)]


def _dependency_groups(model, inputs, occs, N: int, units, max_units: int):
    """Group the noise units by the output positions they reach.

    One forward pass per unit with NaN added at that unit's positions: the
    rows of the logits that turn NaN depend on it (NaN propagates through
    every arithmetic op, so this is a structural test, not one that a zero
    derivative at the clean point could fool).  Units sharing a row are
    joined (union-find); returns ``[(unit indices, row mask)]`` per group.
    """
    parent = list(range(len(units)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_owner = [-1] * N
    size = [1] * len(units)
    rows_of = []
    with analytic_mode(model) as sess:
        for i, (j, u) in enumerate(units):
            o = occs[j]
            taint = torch.zeros(o.units, dtype=o.h.dtype, device=o.h.device)
            taint[u] = float("nan")
            etas = [None] * len(occs)
            etas[j] = taint.reshape(o.mask_shape)
            sess.reset(fixed_eta_policy(etas))
            Zt = select_rows(call_model(model, inputs), N)
            rows = torch.isnan(Zt).any(-1).nonzero().reshape(-1).tolist()
            rows_of.append(rows)
            for r in rows:
                if row_owner[r] < 0:
                    row_owner[r] = i
                    continue
                a, b = find(row_owner[r]), find(i)
                if a != b:
                    parent[b] = a
                    size[a] += size[b]
                    if size[a] > max_units:
                        raise DropcheckError(
                            f"exact enumeration: a group of at least {size[a]} dependent noise units "
                            f"(2^{size[a]} masks) exceeds max_units={max_units}; use Monte Carlo or raise max_units"
                        )
    groups: dict[int, list[int]] = {}
    for i in range(len(units)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) > max_units:
            raise DropcheckError(
                f"exact enumeration: a group of {len(members)} dependent noise units (2^{len(members)} masks) "
                f"exceeds max_units={max_units}; use Monte Carlo or raise max_units"
            )
        mask = torch.zeros(N, dtype=torch.bool)
        for i in members:
            mask[rows_of[i]] = True
        out.append((members, mask))
    return out


def _enumerated_gap(model, inputs, targets, Z, y, occs, max_units: int) -> tuple[float, int]:
    """``R_drop`` by exact enumeration, factorized over independent groups.

    With ``L = (1/N) Σ_n ℓ_n`` and groups ``g`` of units whose rows ``G_g``
    are disjoint (rows reached by no unit keep their clean loss),
    ``E[L] - L = (1/N) Σ_g Σ_{b ∈ {0,1}^{m_g}} P_g(b) Σ_{n ∈ G_g} (ℓ_n(b) - ℓ_n)``,
    ``P_g(b) = Π_u q_u^{b_u} (1-q_u)^{1-b_u}``.  Pass ``k`` applies pattern
    ``k`` of every group at once (a group with fewer patterns stays clean),
    so ``max_g 2^{m_g}`` passes cover all groups.  Returns ``(value, number
    of patterns enumerated Σ_g 2^{m_g})``.
    """
    N = Z.shape[0]
    units = _unit_positions(occs)
    if not units:
        return 0.0, 1
    groups = _dependency_groups(model, inputs, occs, N, units, max_units)
    base_rows = F.cross_entropy(Z.detach(), y, reduction="none")
    dt, dev = Z.dtype, Z.device
    passes = 1 << max(len(g[0]) for g in groups)
    total = torch.zeros((), dtype=dt, device=dev)
    with analytic_mode(model) as sess:
        for k in range(passes):
            etas = [torch.zeros(o.units, dtype=dt, device=dev) for o in occs]
            probs = []
            for members, rows in groups:
                m = len(members)
                if k >= (1 << m):
                    probs.append(None)
                    continue
                p = 1.0
                for bit, i in enumerate(members):
                    j, u = units[i]
                    q = occs[j].site.q
                    dropped = (k >> bit) & 1
                    p *= q if dropped else (1.0 - q)
                    # η in the model's dtype: a float32 q/(1-q) biased float64 gaps by up to 3e-6
                    etas[j][u] = -1.0 if dropped else q / (1.0 - q)
                probs.append(p)
            sess.reset(fixed_eta_policy([e.reshape(o.mask_shape) for e, o in zip(etas, occs)]))
            Zk = select_rows(call_model(model, inputs), N)
            diff = F.cross_entropy(Zk, y, reduction="none") - base_rows
            for (members, rows), p in zip(groups, probs):
                if p is not None:
                    total = total + p * diff[rows.to(dev)].sum()
    return float(total / N), sum(1 << len(g[0]) for g in groups)
