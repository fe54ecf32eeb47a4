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
                    sites: Optional[SiteNames] = None, copies: Optional[int] = None):
    """``lim_{q→0} R_drop/q = Σ_i Σ_u Δ_iu`` (docs/math.md, "When the second-order picture holds").

    ``Δ_iu = L(unit u of site i zeroed) - L + a_u · ∂L/∂h_i``: the deletion of
    one noise unit (every position it covers: a whole feature over time for
    locked sites, one weight for DropConnect) minus its linear prediction.
    Its quadratic part is ``½ a_uᵀ D²L a_u``, i.e. the unweighted
    ``taylor_regularizer`` / 2; the two agree only when each unit's deletion
    is small (wide layers).  Returns a float (or ``{site key: float}``).
    ``sites``: the sites that take part (the others as if their ``q`` were 0).

    Cost: one forward pass per noise unit, i.e. ``Σ_i units_i`` passes of
    the batch (units_i = numel(h_i) for per-position sites: ~ batch · length ·
    width per layer, batch · heads · length² for attention).  The passes are
    batched: a unit of example ``b`` changes only example ``b``'s rows, so
    example ``b`` alone is tiled ``copies`` times along the first axis (the
    inputs' tensors whose first axis is the batch's) and copy ``k`` deletes
    the ``k``-th of a block of its units: ``units / copies`` passes of
    ``copies`` single examples, i.e. ``units / batch`` example-passes in all,
    a ``batch``-fold saving in arithmetic besides the per-pass overhead
    (default ``copies``: a site's tiled input stays under 2^20 elements, at
    most 512).  This is used only after checks that the tiled passes are
    independent clean passes of each example (same logits as the batch's
    rows, the sites' inputs those of the example, a NaN in one copy reaching
    no other, a NaN in example 0 of the batch reaching no other example);
    otherwise, and for sites whose noise is shared over the batch
    (DropConnect, batch-mode stochastic depth), one pass of the whole batch
    per unit.
    """
    Z, y, occs = probe_forward(model, inputs, targets)
    L = mean_loss(Z, y)
    gs = torch.autograd.grad(L, [o.delta for o in occs], allow_unused=True, materialize_grads=True)
    base = float(L.detach())
    lins = [o.unit_sum(g * o.h).reshape(-1).detach() for o, g in zip(occs, gs)]
    out: dict[str, float] = {}
    with torch.no_grad():
        tiled = _tiling(model, inputs, targets, occs, Z, copies)
        for j, o in enumerate(occs):
            if tiled is not None and all(t.ok[j] for t in tiled):
                out[o.key] = _tiled_deletions(model, tiled, occs, j, Z.shape[0]) + float(lins[j].sum())
                continue
            with analytic_mode(model) as sess:
                total = 0.0
                for u in range(o.units):
                    eta = torch.zeros(o.units, dtype=Z.dtype, device=Z.device)
                    eta[u] = -1.0
                    etas = [None] * len(occs)
                    etas[j] = eta.reshape(o.mask_shape)
                    sess.reset(fixed_eta_policy(etas))
                    Lu = float(mean_loss(*flatten_logits(call_model(model, inputs), targets)))
                    total += Lu - base + float(lins[j][u])
                out[o.key] = total
    return out if per_site else sum(out.values())


class _Tiled:
    """One example of the batch tiled ``K`` times and what the checks found
    (``first_order_gap``)."""

    def __init__(self, K, inputs, targets, base, keep, masks, ok):
        self.K, self.inputs, self.targets = K, inputs, targets
        self.base, self.keep, self.masks, self.ok = base, keep, masks, ok


def _tile(inputs, B: int, b: int, K: int):
    """Example ``b`` of the batch (``B`` examples) tiled ``K`` times: every
    tensor whose first axis has length ``B`` is cut to row ``b`` and repeated;
    other inputs pass as they are."""

    def one(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == B:
            return t[b:b + 1].expand(K, *t.shape[1:]).contiguous()
        return t

    if isinstance(inputs, Mapping):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(one(v) for v in inputs)
    return one(inputs)


def _copy_sums(logits: torch.Tensor, y_rep: torch.Tensor, K: int, keep: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each of the ``K`` copies over its kept positions."""
    c = logits.shape[-1]
    rows = F.cross_entropy(logits.reshape(-1, c), y_rep.reshape(-1).clamp_min(0), reduction="none").reshape(K, -1)
    return (rows * keep).sum(1)


def _tiling(model, inputs, targets, occs, Z, copies):
    """For each example ``b``: the example alone, tiled ``K`` times, and the
    checks that the tiled pass is ``K`` independent clean passes of it whose
    sites' inputs are example ``b``'s (``first_order_gap``).  ``None`` where
    the batch cannot be split this way."""
    if not isinstance(targets, torch.Tensor) or targets.dim() < 1 or not occs:
        return None
    B = targets.shape[0]
    per_example = max(o.h.numel() for o in occs) // max(1, B)
    K = int(copies) if copies is not None else max(1, min(512, (1 << 20) // max(1, per_example)))
    K = min(K, max(o.units // B if o.mask_shape[0] == B else 1 for o in occs))
    if K < 2 or Z.shape[0] != targets.numel() - int((targets == -100).sum()):
        return None
    kept_rows = (targets.reshape(B, -1) != -100)
    row_start = torch.cumsum(kept_rows.sum(1), 0) - kept_rows.sum(1)
    out = []
    try:
        with analytic_mode(model) as sess:
            for b in range(B):
                x_rep = _tile(inputs, B, b, K)
                y_rep = targets[b:b + 1].expand(K, *targets.shape[1:])
                keep = (y_rep.reshape(K, -1) != -100).to(Z.dtype)
                sess.reset(None)
                logits = call_model(model, x_rep)
                rep = list(sess.occurrences)
                c = logits.shape[-1]
                if len(rep) != len(occs) or logits.shape[0] != K:
                    return None
                n_b = int(kept_rows[b].sum())
                mine = logits[:1].reshape(-1, c)[kept_rows[b].reshape(-1)]
                ref = Z.detach()[int(row_start[b]):int(row_start[b]) + n_b]
                if not torch.allclose(mine, ref, rtol=1e-6, atol=1e-9 * float(Z.abs().max()) + 1e-30):
                    return None
                ok, masks = [], []
                for o, r in zip(occs, rep):
                    m0 = o.mask_shape
                    good = (o.site.structure not in ("weight", "batch") and m0[0] == B == o.h.shape[0]
                            and tuple(r.h.shape) == (K,) + tuple(o.h.shape[1:])
                            and tuple(r.mask_shape) == (K,) + tuple(m0[1:])
                            and torch.equal(r.h[0], o.h.detach()[b]))
                    ok.append(good)
                    masks.append(tuple(r.mask_shape))
                base = _copy_sums(logits, y_rep, K, keep)
                # independence of the copies: a NaN in copy 0's first unit reaches no other copy
                for j in range(len(occs)):
                    if not ok[j]:
                        continue
                    eta = torch.zeros(masks[j], dtype=Z.dtype, device=Z.device)
                    eta.view(-1)[0] = float("nan")
                    etas = [None] * len(occs)
                    etas[j] = eta
                    sess.reset(fixed_eta_policy(etas))
                    t = call_model(model, x_rep).reshape(K, -1)
                    if torch.isnan(t[1:]).any():
                        ok[j] = False
                out.append(_Tiled(K, x_rep, y_rep, base, keep, masks, ok))
    except DropcheckError:
        raise
    except Exception:  # the model does not take its examples one by one this way: one pass per unit
        return None
    # a unit of example b must reach only example b's rows (checked for the first unit of each site)
    for j, o in enumerate(occs):
        if all(t.ok[j] for t in out) and not _reaches_own_example_only(model, inputs, occs, j, B, targets, Z):
            for t in out:
                t.ok[j] = False
    return out


def _reaches_own_example_only(model, inputs, occs, j, B, targets, Z) -> bool:
    """A NaN in the first unit of example 0 of occurrence ``j`` (full batch)
    reaches only example 0's rows of the logits."""
    o = occs[j]
    eta = torch.zeros(o.units, dtype=Z.dtype, device=Z.device)
    eta[0] = float("nan")
    etas = [None] * len(occs)
    etas[j] = eta.reshape(o.mask_shape)
    with analytic_mode(model) as sess:
        sess.reset(fixed_eta_policy(etas))
        t = call_model(model, inputs)
    if t.shape[0] != B:
        return False
    return not torch.isnan(t[1:]).any()


def _tiled_deletions(model, tiled: list, occs, j: int, N: int) -> float:
    """``Σ_u [L(unit u of occurrence j zeroed) − L]`` with ``L`` the mean over
    the batch's ``N`` kept positions: the units of example ``b`` are deleted
    ``K`` at a time in the tiled passes of example ``b`` alone (a unit of
    example ``b`` changes only example ``b``'s rows)."""
    o = occs[j]
    B = o.mask_shape[0]
    Ub = o.units // B
    total = 0.0
    with analytic_mode(model) as sess:
        for tl in tiled:
            K = tl.K
            for start in range(0, Ub, K):
                n = min(K, Ub - start)
                eta = torch.zeros(K, Ub, dtype=o.h.dtype, device=o.h.device)
                eta[torch.arange(n), torch.arange(start, start + n)] = -1.0
                etas = [None] * len(occs)
                etas[j] = eta.reshape(tl.masks[j])
                sess.reset(fixed_eta_policy(etas))
                sums = _copy_sums(call_model(model, tl.inputs), tl.targets, K, tl.keep)
                total += float((sums - tl.base)[:n].sum())
    return total / N


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
