"""Assertions with statistical tolerances: each names what it compares and,
on failure, reports the z-score, both estimates and the inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from ._own import own_dropout_gap
from ._stats import Z_MAX, mean_stderr, two_sample_z


def describe_inputs(inputs, targets=None) -> str:
    """A one-line description of a batch (shapes, dtypes, ignored targets)."""

    def one(t):
        if isinstance(t, torch.Tensor):
            return f"tensor{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"
        return type(t).__name__

    if isinstance(inputs, dict):
        s = "{" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"
    elif isinstance(inputs, (tuple, list)):
        s = "(" + ", ".join(one(v) for v in inputs) + ")"
    else:
        s = one(inputs)
    if targets is not None:
        ign = int((targets == -100).sum()) if isinstance(targets, torch.Tensor) else 0
        s += f", targets {one(targets)} ({ign} ignored)"
    return s


def _seed(generator) -> Union[int, torch.Generator, None]:
    return generator


@dataclass
class Comparison:
    """The outcome of a statistical check: what was compared, both sides
    with their standard errors, and the z-score of the difference."""

    what: str
    left: float
    left_se: float
    right: float
    right_se: float
    z: float
    z_max: float
    context: str = ""

    def __str__(self) -> str:
        return (f"{self.what}: {self.left:.6g} ± {self.left_se:.2g} vs {self.right:.6g} ± {self.right_se:.2g}, "
                f"z = {self.z:.2f} (|z| must be < {self.z_max}){'; ' + self.context if self.context else ''}")


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def assert_gap_matches_own_dropout(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    samples: int = 400,
    *,
    generator: int = 0,
    z_max: float = Z_MAX,
    min_resolution: float = 4.0,
    sites=None,
) -> Comparison:
    """dropcheck's Monte Carlo ``dropout_gap`` (4.1) equals the model's own
    train-mode gap (``own_dropout_gap``): ``|z| < z_max`` for the difference
    of the two independent estimates, ``samples`` draws each (seeds
    ``generator`` and ``generator + 1``).  ``min_resolution``: the own gap
    must exceed that many standard errors, else agreement says nothing and
    the check fails asking for more samples (0 turns this off).  Returns the
    ``Comparison``; raises ``AssertionError`` with the z-score, both
    estimates and the inputs."""
    import dropcheck as dc

    own = own_dropout_gap(model, inputs, targets, samples, generator=int(generator))
    ours = dc.dropout_gap(model, inputs, targets, samples=samples, generator=int(generator) + 1, sites=sites)
    z = two_sample_z(ours.value, ours.stderr, own.value, own.stderr)
    ctx = f"{type(model).__name__}, inputs {describe_inputs(inputs, targets)}, samples={samples}, seeds {generator}/{generator + 1}"
    cmp = Comparison("dropcheck.dropout_gap vs the model's own train-mode gap", ours.value, ours.stderr,
                     own.value, own.stderr, z, z_max, ctx)
    if min_resolution and not abs(own.value) > min_resolution * own.stderr:
        _fail(f"unresolved: the own gap {own.value:.4g} ± {own.stderr:.2g} is within {min_resolution} standard "
              f"errors of 0, so agreement would say nothing; raise samples ({cmp})")
    if not abs(z) < z_max:
        _fail(str(cmp))
    return cmp


def assert_second_order_holds(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    q: Optional[float] = None,
    *,
    rtol: float = 0.25,
    against: str = "taylor",
    samples: int = 400,
    generator: int = 0,
    z_max: float = Z_MAX,
) -> Comparison:
    """The second-order picture (4.2) holds for this model and batch at drop
    probability ``q`` (every site set to ``q`` by ``with_drop_probability``;
    ``None``: the model's own): the dropout gap ``R_drop`` agrees with
    ``R_taylor`` (``against="taylor"``) or with the λ-weighted ``R_approx``
    (``against="approx"``, which also drops the non-Gauss-Newton Hessian
    term) to relative tolerance ``rtol``, beyond ``z_max`` standard errors
    of the Monte Carlo gap:
    ``|R_drop − R_2| <= rtol·|R_2| + z_max·se``.  The gap must be resolved
    (``z_max·se <= rtol·|R_2|``) unless it misses anyway; else the check
    fails asking for more samples.
    ``R_drop`` is the tighter of two unbiased estimates, which must agree
    first: the model's own train-mode gap and dropcheck's ``dropout_gap``
    with ``control_variate="auto"`` (near the linear regime, where the
    picture can hold, the control variate narrows the bar many-fold).

    This is not a small-``q`` property: for Bernoulli dropout
    ``R_drop/R_taylor`` tends to ``first_order_gap/(R_taylor/q)`` as
    ``q → 0``, which is 1 only for wide layers (docs/math.md).  Use
    ``dropcheck.taylor_regime`` to find where it holds."""
    import dropcheck as dc

    if against not in ("taylor", "approx"):
        raise ValueError(f"against must be 'taylor' or 'approx', got {against!r}")
    m = model if q is None else dc.with_drop_probability(model, q, inputs=inputs)
    own = own_dropout_gap(m, inputs, targets, samples, generator=int(generator))
    ours = dc.dropout_gap(m, inputs, targets, samples=samples, generator=int(generator) + 1, control_variate="auto")
    agree = two_sample_z(own.value, own.stderr, ours.value, ours.stderr)
    if not abs(agree) < z_max:
        _fail(f"dropcheck's R_drop {ours.value:.4g} ± {ours.stderr:.2g} and the model's own gap {own.value:.4g} ± "
              f"{own.stderr:.2g} disagree (z = {agree:.2f}); check assert_gap_matches_own_dropout first")
    best, which = (own, "own dropout gap") if own.stderr <= ours.stderr else (ours, "R_drop (dropcheck, control variate)")
    with torch.no_grad():
        if against == "taylor":
            r2 = float(dc.taylor_regularizer(m, inputs, targets))
        else:
            r2 = float(dc.explicit_regularizer(m, inputs, targets))
    name = "R_taylor" if against == "taylor" else "λ·R_approx"
    tol = rtol * abs(r2) + z_max * best.stderr
    z = (best.value - r2) / best.stderr if best.stderr > 0 else (0.0 if best.value == r2 else math.inf)
    ctx = (f"q={'own' if q is None else q}, ratio R_drop/{name} = {best.value / r2 if r2 else math.inf:.3g}, "
           f"own gap {own.value:.4g} ± {own.stderr:.2g}, rtol={rtol}, {type(model).__name__}, "
           f"inputs {describe_inputs(inputs, targets)}, samples={samples}")
    cmp = Comparison(f"{which} vs {name}", best.value, best.stderr, r2, 0.0, z, z_max, ctx)
    if not abs(best.value - r2) <= tol:
        _fail(f"second-order picture fails: |R_drop − {name}| = {abs(best.value - r2):.4g} > "
              f"rtol·|{name}| + z_max·se = {tol:.4g}; {cmp}")
    if z_max * best.stderr > rtol * abs(r2):
        _fail(f"unresolved: z_max·se = {z_max * best.stderr:.3g} exceeds rtol·|{name}| = {rtol * abs(r2):.3g}, so "
              f"the check could not fail; raise samples; {cmp}")
    return cmp


def assert_unbiased(
    estimator_call: Callable[[torch.Generator], object],
    exact,
    samples: int = 200,
    *,
    seed: int = 0,
    z_max: float = Z_MAX,
    what: str = "estimator",
) -> Comparison:
    """An unbiased estimator's mean over ``samples`` independent calls equals
    ``exact``: ``estimator_call(generator)`` is called with
    ``torch.Generator().manual_seed(seed + k)``, ``k = 0..samples-1``, and
    each element's ``|z| < z_max`` (for a tensor, the worst element is
    reported).  Values are compared in float64."""
    vals = []
    for k in range(int(samples)):
        g = torch.Generator().manual_seed(int(seed) + k)
        v = estimator_call(g)
        v = v.value if hasattr(v, "value") and not isinstance(v, torch.Tensor) else v
        vals.append(torch.as_tensor(v, dtype=torch.float64).detach().reshape(-1))
    V = torch.stack(vals)  # (samples, elements)
    ex = torch.as_tensor(exact, dtype=torch.float64).detach().reshape(-1).expand(V.shape[1])
    mean = V.mean(0)
    se = V.std(0, unbiased=True) / math.sqrt(V.shape[0])
    se = torch.maximum(se, 1e-12 * torch.maximum(mean.abs(), ex.abs()))
    d = mean - ex
    z = torch.where(se > 0, d / se, torch.where(d == 0, torch.zeros_like(d), torch.full_like(d, math.inf)))
    k = int(z.abs().argmax())
    cmp = Comparison(f"mean of {what} vs exact" + (f" (element {k} of {V.shape[1]})" if V.shape[1] > 1 else ""),
                     float(mean[k]), float(se[k]), float(ex[k]), 0.0, float(z[k]), z_max,
                     f"samples={samples}, seeds {seed}..{seed + samples - 1}")
    if not abs(float(z[k])) < z_max:
        _fail(f"biased? {cmp}")
    return cmp


__all__ = ["assert_gap_matches_own_dropout", "assert_second_order_holds", "assert_unbiased", "Comparison",
           "describe_inputs", "mean_stderr"]
