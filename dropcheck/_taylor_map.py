"""Where the second-order picture of dropout holds (``dropcheck taylor-map``).

For a model and a grid of ``q`` (and, for the built-in family, of widths) it
measures ``R_drop / (λ R_approx)`` and ``R_drop / R_taylor`` for Bernoulli
dropout and for multiplicative Gaussian noise of the same variance
``q/(1-q)`` (docs/math.md, "When the second-order picture holds"):

- Gaussian noise: ``R_drop = R_taylor + O(q²)``, so the ratio → 1 as q → 0;
- Bernoulli noise: ``R_drop/q → Σ Δ_ik`` while ``R_taylor/q → ½ Σ h² ∂²ℓ/∂h²``;
  the ratio of the two limits (``limit_ratio``) → 1 only as layers widen.

A ratio ``R_drop/(λ R_approx)`` near 2 would mean the multiplier
``q/(1-q)`` rather than the derived ``q/(2(1-q))`` matches dropout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ._errors import DropcheckError
from ._explicit import explicit_regularizer, taylor_regularizer
from ._gap import dropout_gap, first_order_gap
from ._site_api import with_drop_probability
from ._sites import dropout_lambda

DEFAULT_QS = (0.01, 0.03, 0.1, 0.2, 0.4, 0.6)
DEFAULT_WIDTHS = (4, 16, 64, 256)


def tanh_family(width: int, *, d_in: int = 8, classes: int = 5, n: int = 16, seed: int = 0):
    """The built-in family: ``x → tanh(W₁x) → Dropout → tanh(W₂h) → W₃ →`` logits,
    ``W₁ ~ N(0, 1/d_in)``, ``W₂ ~ N(0, 1/width)``, ``W₃ ~ 3·N(0, 1/width)``.
    The 1/sqrt(width) scalings keep pre-activations and logits O(1) as the
    layer widens, so each dropped unit's contribution shrinks; the tanh after
    the site makes ``R_taylor`` differ from ``λ R_approx``.  float64;
    returns ``(model, X, y)``."""
    g = torch.Generator().manual_seed(seed)

    def lin(i, o, std):
        m = nn.Linear(i, o).double()
        with torch.no_grad():
            m.weight.copy_(std * torch.randn(o, i, generator=g, dtype=torch.float64))
            m.bias.copy_(0.3 * torch.randn(o, generator=g, dtype=torch.float64))
        return m

    model = nn.Sequential(
        lin(d_in, width, 1 / math.sqrt(d_in)), nn.Tanh(), nn.Dropout(0.1),
        lin(width, width, 1.5 / math.sqrt(width)), nn.Tanh(), lin(width, classes, 3 / math.sqrt(width)),
    )
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, X, y


@dataclass
class MapRow:
    model: str
    width: Optional[int]
    q: float
    noise: str
    R_drop: float
    R_drop_stderr: float
    R_approx_weighted: float
    R_taylor: float
    ratio_approx: float  # R_drop / (λ R_approx)
    ratio_approx_stderr: float
    ratio_taylor: float  # R_drop / R_taylor
    ratio_taylor_stderr: float
    limit_ratio: Optional[float]  # Bernoulli: lim_{q→0} R_drop/R_taylor = ΣΔ / (½ Σ h² ∂²ℓ)
    estimator: str = "exact"  # of R_approx and R_taylor; stderr of the ratios includes theirs if not exact
    R_approx_stderr: float = 0.0  # of λR_approx (0 when exact)
    R_taylor_stderr: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def map_model(
    name: str,
    model: nn.Module,
    inputs,
    targets,
    qs: Iterable[float],
    *,
    width: Optional[int] = None,
    samples: int = 1000,
    seed: int = 0,
    noises=("bernoulli", "gaussian"),
    limit: bool = True,
    estimator: str = "exact",
    estimator_samples: int = 200,
    progress: Optional[Callable[[], None]] = None,
) -> list[MapRow]:
    """Rows for one model over ``qs`` (every site gets the same ``q``).

    ``R_approx`` and ``R_taylor`` are exact (they scale with ``λ(q)`` only);
    ``R_drop`` is Monte Carlo with a control variate (Bernoulli) or antithetic
    pairs (Gaussian), ``samples`` draws each, standard errors propagated to
    the ratios.  ``limit=True`` adds the Bernoulli q → 0 limit ratio (one
    forward pass per noise unit).  ``estimator="hutchinson"`` estimates
    ``R_approx`` and ``R_taylor`` from ``estimator_samples`` probes each (for
    models too large for the exact Jacobian); their standard errors, from 10
    batches of probes, enter the ratios' standard errors.
    """
    # unweighted values do not depend on q; ΣΔ neither (deletions)
    rel_se_a = rel_se_t = 0.0
    if estimator == "exact":
        approx_u = float(explicit_regularizer(model, inputs, targets, weighted=False).detach())
        taylor_u = float(taylor_regularizer(model, inputs, targets, weighted=False).detach())
    else:
        if estimator_samples < 10:
            raise DropcheckError(f"estimator_samples must be >= 10 (10 batches of probes give the standard "
                                 f"error), got {estimator_samples}")
        per = estimator_samples // 10
        gen = torch.Generator().manual_seed(seed + 1)
        a = torch.tensor([float(explicit_regularizer(model, inputs, targets, weighted=False, estimator=estimator,
                                                     samples=per, generator=gen).detach()) for _ in range(10)])
        t = torch.tensor([float(taylor_regularizer(model, inputs, targets, weighted=False, estimator=estimator,
                                                   samples=per, generator=gen).detach()) for _ in range(10)])
        approx_u, taylor_u = float(a.mean()), float(t.mean())
        rel_se_a = float(a.std() / math.sqrt(10)) / abs(approx_u)
        rel_se_t = float(t.std() / math.sqrt(10)) / abs(taylor_u)
    lim = None
    if limit and "bernoulli" in noises:
        lim = float(first_order_gap(model, inputs, targets)) / (0.5 * taylor_u)
    rows = []
    for q in qs:
        lam = dropout_lambda(q)
        model_q = with_drop_probability(model, q, inputs=inputs)  # functional sites too
        for noise in noises:
            kw = dict(control_variate=True) if noise == "bernoulli" else dict(antithetic=True)
            gap = dropout_gap(model_q, inputs, targets, samples=samples, generator=seed, noise=noise, **kw)
            ra, rt = lam * approx_u, lam * taylor_u
            rg = gap.stderr / abs(gap.value) if gap.value else 0.0
            sa = abs(gap.value / ra) * math.hypot(rg, rel_se_a) if rel_se_a else gap.stderr / abs(ra)
            st = abs(gap.value / rt) * math.hypot(rg, rel_se_t) if rel_se_t else gap.stderr / abs(rt)
            rows.append(MapRow(
                name, width, q, noise, gap.value, gap.stderr, ra, rt,
                gap.value / ra, sa, gap.value / rt, st,
                lim if noise == "bernoulli" else None, estimator, rel_se_a * abs(ra), rel_se_t * abs(rt),
            ))
            if progress:
                progress()
    return rows


def format_rows(rows: list[MapRow]) -> str:
    head = ["model", "width", "q", "noise", "R_drop", "±", "λR_approx", "R_taylor",
            "R_drop/λR_approx", "R_drop/R_taylor", "q→0 limit"]
    body = [[r.model, "-" if r.width is None else str(r.width), f"{r.q:g}", r.noise,
             f"{r.R_drop:.4g}", f"{r.R_drop_stderr:.1g}", f"{r.R_approx_weighted:.4g}", f"{r.R_taylor:.4g}",
             f"{r.ratio_approx:.3f} ± {r.ratio_approx_stderr:.3f}", f"{r.ratio_taylor:.3f} ± {r.ratio_taylor_stderr:.3f}",
             "-" if r.limit_ratio is None else f"{r.limit_ratio:.3f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])
