"""In which regime is my model?  ``taylor_regime``: the dropout gap against
its second-order picture and its first-order limit, at a few ``q``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ._errors import DropcheckError
from ._explicit import explicit_regularizer, taylor_regularizer
from ._gap import dropout_gap, first_order_gap
from ._site_api import find_sites, with_drop_probability
from ._sites import dropout_lambda

DEFAULT_REGIME_QS = (0.01, 0.05, 0.1, 0.3)


@dataclass
class RegimeRow:
    """One drop probability ``q`` (every site at ``q``)."""

    q: float
    own: float  # the model's own train-mode gap (Monte Carlo)
    own_stderr: float
    r_drop: float  # dropcheck's R_drop (Monte Carlo, control variate chosen from a pilot)
    r_drop_stderr: float
    lam_r_approx: float  # λ(q) R_approx (4.4)
    r_taylor: float  # R_taylor (4.2) = λ(q) · unweighted
    first_order: float  # q · lim R_drop/q (first_order_gap)
    holds: Optional[bool]  # |R_drop − R_taylor| <= rtol |R_taylor| (None: not resolved)

    @property
    def best(self) -> tuple[float, float]:
        """The tighter of the two unbiased gap estimates: ``(value, stderr)``."""
        return (self.own, self.own_stderr) if self.own_stderr <= self.r_drop_stderr else (self.r_drop, self.r_drop_stderr)


@dataclass
class TaylorRegime:
    """The report of ``taylor_regime``: rows per ``q``, the ``q → 0`` limit of
    ``R_drop / R_taylor`` (``limit_ratio``), and ``q_holds``: the largest
    ``q`` tried up to which the second-order picture holds within ``rtol``
    at every ``q`` tried (``None``: not at any ``q`` tried)."""

    rows: list[RegimeRow]
    limit_ratio: float
    rtol: float
    z: float
    q_holds: Optional[float]
    resolved: bool = True  # every row up to q_holds resolved (else: consistent with the limit, not shown)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lim = (f"q -> 0 limit of R_drop/R_taylor = {self.limit_ratio:.3f} (first-order deletions / their quadratic "
               "part; near 1 only for wide layers)")
        pic = f"the second-order picture (R_drop = R_taylor within {self.rtol:.0%})"
        if self.q_holds is None:
            why = "it fails as q -> 0" if abs(self.limit_ratio - 1.0) > self.rtol else "it fails at the smallest q"
            return f"{pic} holds not at any q tried ({', '.join(f'{r.q:g}' for r in self.rows)}): {why}; {lim}"
        if self.resolved:
            return f"{pic} holds for q <= {self.q_holds:g} (every q tried up to it, and as q -> 0); {lim}"
        return (f"{pic} is consistent with holding for q <= {self.q_holds:g}: it holds as q -> 0, but the Monte "
                f"Carlo gap is not resolved to {self.rtol:.0%} at every q up to it (raise samples); {lim}")

    def __str__(self) -> str:
        head = ["q", "own gap", "±", "R_drop", "±", "λR_approx", "R_taylor", "q·ΣΔ (1st order)", "R/R_taylor",
                "holds"]
        body = []
        for r in self.rows:
            v, _ = r.best
            body.append([f"{r.q:g}", f"{r.own:.4g}", f"{r.own_stderr:.1g}", f"{r.r_drop:.4g}", f"{r.r_drop_stderr:.1g}",
                         f"{r.lam_r_approx:.4g}", f"{r.r_taylor:.4g}", f"{r.first_order:.4g}",
                         f"{v / r.r_taylor:.3f}" if r.r_taylor else "-",
                         {True: "yes", False: "no", None: "unresolved"}[r.holds]])
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
                         + [self.summary()] + self.notes)


def taylor_regime(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    qs: Sequence[float] = DEFAULT_REGIME_QS,
    *,
    rtol: float = 0.2,
    samples: int = 400,
    generator: int = 0,
    z: float = 3.0,
    estimator: str = "exact",
    estimator_samples: int = 64,
) -> TaylorRegime:
    """Where does the second-order picture of dropout hold for this model and
    batch?  For each ``q`` in ``qs`` (every site set to ``q`` by
    ``with_drop_probability``, functional sites included) the report gives:

    - the model's own train-mode gap (``dropcheck.testing.own_dropout_gap``)
      and dropcheck's ``dropout_gap`` (control variate chosen from a pilot),
      each ± its standard error;
    - ``λ(q) R_approx`` (4.4), ``R_taylor`` (4.2), and the first-order gap
      ``q · Σ Δ`` (``first_order_gap``, the exact ``q → 0`` slope of ``R_drop``);
    - ``holds``: ``|R_drop − R_taylor| <= rtol·|R_taylor|`` for the tighter
      of the two gap estimates, beyond ``z`` standard errors; ``None`` when
      the error bar is too wide to tell (``z·se > rtol·|R_taylor|``).

    ``q_holds``: the largest ``q`` tried below which the picture holds: the
    ``q → 0`` limit ratio ``first_order_gap / (R_taylor/q)`` is within
    ``rtol`` of 1 and no row up to ``q`` fails (``resolved`` says whether
    every one of those rows was resolved, else they are only consistent with
    it).  ``None``: "not at any q tried".  For Bernoulli dropout this is not
    a small-``q`` property: ``R_drop/R_taylor`` tends to ``limit_ratio`` as
    ``q → 0`` (docs/math.md), so a model whose limit ratio is off by more
    than ``rtol`` holds at no ``q``.

    Cost: ``first_order_gap`` once, ``R_approx`` and ``R_taylor`` once
    (unweighted; ``estimator="hutchinson"`` for models too large for the
    exact Jacobian), and per ``q`` about ``2·samples`` forward passes.
    """
    from .testing._own import own_dropout_gap

    qs = sorted(float(q) for q in qs)
    if not qs or not all(0.0 < q < 1.0 for q in qs):
        raise DropcheckError(f"taylor_regime: qs must be drop probabilities in (0, 1), got {qs}")
    if not rtol > 0:
        raise DropcheckError(f"taylor_regime: rtol must be > 0, got {rtol!r}")
    sites = find_sites(model, inputs)
    notes = []
    if any(s.noise != "bernoulli" for s in sites):
        notes.append("note: Gaussian sites present; their q -> 0 limit is R_taylor itself")
    with torch.no_grad():
        if estimator == "exact":
            approx_u = float(explicit_regularizer(model, inputs, targets, weighted=False))
            taylor_u = float(taylor_regularizer(model, inputs, targets, weighted=False))
        else:
            approx_u = float(explicit_regularizer(model, inputs, targets, weighted=False, estimator=estimator,
                                                  samples=estimator_samples, generator=generator).detach())
            taylor_u = float(taylor_regularizer(model, inputs, targets, weighted=False, estimator=estimator,
                                                samples=estimator_samples, generator=generator).detach())
            notes.append(f"note: R_approx and R_taylor from {estimator_samples} {estimator} probes")
        slope = float(first_order_gap(model, inputs, targets))
    limit_ratio = slope / (0.5 * taylor_u) if taylor_u else math.inf
    rows = []
    for k, q in enumerate(qs):
        m = with_drop_probability(model, q, inputs=inputs)
        own = own_dropout_gap(m, inputs, targets, samples, generator=generator + 2 * k)
        ours = dropout_gap(m, inputs, targets, samples=samples, generator=generator + 2 * k + 1,
                           control_variate="auto")
        lam = dropout_lambda(q)
        rt = lam * taylor_u
        row = RegimeRow(q, own.value, own.stderr, ours.value, ours.stderr, lam * approx_u, rt, q * slope, None)
        v, se = row.best
        if z * se <= rtol * abs(rt):
            row.holds = abs(v - rt) <= rtol * abs(rt) + z * se
        elif abs(v - rt) > rtol * abs(rt) + z * se:
            row.holds = False  # resolved as a miss even with the wide bar
        rows.append(row)
    # "holds below q": only if it holds as q -> 0 (the limit ratio) and at every q tried up to q
    limit_ok = abs(limit_ratio - 1.0) <= rtol
    q_holds, resolved = None, True
    if limit_ok:
        for r in rows:
            if r.holds is False:
                break
            q_holds = r.q
            resolved = resolved and r.holds is True
    return TaylorRegime(rows, limit_ratio, float(rtol), float(z), q_holds, resolved, notes)
