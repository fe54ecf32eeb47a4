"""Cross-route checks behind ``dropcheck verify``.

Every check compares one quantity by two independent routes and records the
measured error against a stated tolerance.  Deterministic checks use a
relative error; statistical ones a z-score (estimate minus reference over
its standard error) with ``|z| <= 4.5``, a false-alarm rate of about 7e-6
per check for a Gaussian statistic; seeds are fixed, so a run replays.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from . import _reference as ref
from ._analytic import as_generator
from ._cases import Case
from ._explicit import clean_forward, explicit_regularizer, taylor_regularizer
from ._gap import dropout_gap, first_order_gap
from ._implicit import implicit_noise, implicit_noise_jacobian
from ._sites import BERNOULLI, find_sites

Z_TOL = 4.5
DENSE_LIMIT = 4096  # largest numel(h) for the dense O(numel²) references
ENUM_LIMIT = 14  # largest number of noise units enumerated exactly


@dataclass
class Check:
    case: str
    quantity: str
    route_a: str
    route_b: str
    value_a: Optional[float]
    value_b: Optional[float]
    error: Optional[float]
    metric: str  # "rel" or "|z|"
    tolerance: float
    status: str  # "pass", "FAIL", "skip"
    seconds: float = 0.0
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def rel_err(a: float, b: float, floor: float = 1e-300) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


@contextmanager
def set_q(model, q: float) -> Iterator[None]:
    """Temporarily give every dropout site of ``model`` drop probability ``q``."""
    sites = find_sites(model)
    saved = [(s.module, s.module.p) for s in sites]
    try:
        for m, _ in saved:
            m.p = q
        yield
    finally:
        for m, p in saved:
            m.p = p


def _draws(fn: Callable[[torch.Generator], float], n: int, seed: int) -> tuple[float, float]:
    gen = as_generator(seed)
    vals = torch.tensor([fn(gen) for _ in range(n)], dtype=torch.float64)
    return float(vals.mean()), float(vals.std(unbiased=True) / math.sqrt(n))


class _Recorder:
    def __init__(self, case: str):
        self.case = case
        self.rows: list[Check] = []

    def rel(self, quantity, a_name, b_name, a, b, tol, t0, note=""):
        err = rel_err(a, b)
        self.rows.append(Check(self.case, quantity, a_name, b_name, a, b, err, "rel", tol,
                               "pass" if err <= tol else "FAIL", time.perf_counter() - t0, note))

    def z(self, quantity, a_name, b_name, a, b, se, t0, note="", slack=0.0):
        z = abs(a - b - math.copysign(min(abs(a - b), slack), a - b)) / se if se > 0 else (0.0 if a == b else math.inf)
        self.rows.append(Check(self.case, quantity, a_name, b_name, a, b, z, "|z|", Z_TOL,
                               "pass" if z <= Z_TOL else "FAIL", time.perf_counter() - t0, note))

    def skip(self, quantity, a_name, b_name, why):
        self.rows.append(Check(self.case, quantity, a_name, b_name, None, None, None, "-", 0.0, "skip", 0.0, why))


def run_case(case: Case, *, draws: int = 300, seed: int = 0, symbolic: Optional[Callable] = None) -> list[Check]:
    """All checks for one case (model, inputs, targets)."""
    R = _Recorder(case.name)
    model, X, y = case.model, case.inputs, case.targets
    with torch.no_grad():
        _, _, occs = clean_forward(model, X, y)
    biggest = max(o.h.numel() for o in occs)
    bernoulli = all(o.site.noise == BERNOULLI for o in occs)

    def per_site_vs_dense(quantity, a_name, b_name, ours_fn, dense_fn) -> float:
        """Per-site values against a dense torch.func route; returns our total."""
        t0 = time.perf_counter()
        ours = {k: _f(v) for k, v in ours_fn(model, X, y, per_site=True).items()}
        if biggest > DENSE_LIMIT:
            R.skip(quantity, a_name, b_name, f"numel(h)={biggest} > {DENSE_LIMIT}")
        else:
            dense = dense_fn(model, X, y)
            worst = max(rel_err(ours[k], dense[k], 1e-15) for k in dense)
            R.rows.append(Check(case.name, quantity, a_name, b_name, sum(ours.values()), sum(dense.values()),
                                worst, "rel", 1e-9, "pass" if worst <= 1e-9 else "FAIL", time.perf_counter() - t0))
        return sum(ours.values())

    # 1-2. exact estimator vs dense Jacobian route; Taylor term vs dense Hessian
    exact = per_site_vs_dense("R_approx (weighted, per site)", "exact (batched VJPs)",
                              "dense J^T H J with C (torch.func)", explicit_regularizer, ref.dense_explicit)
    taylor = per_site_vs_dense("R_taylor (weighted, per site)", "exact (batched HVPs)",
                               "dense Hessian with C (torch.func)", taylor_regularizer, ref.dense_taylor)

    if case.linear_after_sites:
        t0 = time.perf_counter()
        R.rel("R_taylor = weighted R_approx (only softmax after sites)", "taylor_regularizer",
              "explicit_regularizer", taylor, exact, 1e-10, t0)

    # 3. unbiased estimators
    for est in ("sampled", "hutchinson"):
        t0 = time.perf_counter()
        m, se = _draws(lambda g: _f(explicit_regularizer(model, X, y, estimator=est, generator=g)), draws, seed)
        R.z(f"R_approx {est} estimator", f"{est} ({draws} draws)", "exact", m, exact, se, t0)
    t0 = time.perf_counter()
    fd = sum(_f(v) for v in explicit_regularizer(
        model, X, y, estimator="fd", generator=seed, eps=1e-5, per_site=True).values())
    hu = _f(explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed))
    R.rel("R_approx fd vs JVP, same probe", "fd (eps=1e-5, per site)", "hutchinson", fd, hu, 1e-6, t0,
          "O(eps^2) bias")

    # 4. dropout gap: exact enumeration vs Monte Carlo; first-order identity in q
    units = sum(o.units for o in occs)
    if bernoulli and units <= ENUM_LIMIT:
        t0 = time.perf_counter()
        ex = dropout_gap(model, X, y, exact=True, max_units=ENUM_LIMIT)
        mc = dropout_gap(model, X, y, samples=2000, generator=seed, control_variate=True)
        R.z("R_drop", "Monte Carlo (2000, control variate)", f"exact enumeration (2^{units})",
            mc.value, ex.value, mc.stderr, t0)
        t0 = time.perf_counter()
        q0 = 1e-4
        with set_q(model, q0):
            ex0 = dropout_gap(model, X, y, exact=True, max_units=ENUM_LIMIT).value / q0
            lim = first_order_gap(model, X, y)
        R.rel("lim R_drop/q = sum Delta_ik", f"exact R_drop/q at q={q0}", "sum of deletions Delta_ik",
              ex0, lim, 1e-2, t0, "error O(q)")
    elif not bernoulli:
        t0 = time.perf_counter()
        with set_q(model, 0.01):
            gap = dropout_gap(model, X, y, samples=4000, generator=seed, antithetic=True)
            tay = _f(taylor_regularizer(model, X, y))
        R.z("Gaussian R_drop -> R_taylor as q -> 0", "MC gap, q=0.01 (antithetic)", "R_taylor",
            gap.value, tay, gap.stderr, t0, "tolerates O(q) = 5% bias", slack=0.05 * abs(tay))
    else:
        R.skip("R_drop", "Monte Carlo", "exact enumeration", f"{units} noise units > {ENUM_LIMIT}")

    # 5. implicit noise: fd vs autograd with the same eta; exact covariance vs samples
    t0 = time.perf_counter()
    a = implicit_noise(model, X, y, generator=seed)
    b = implicit_noise(model, X, y, generator=seed, estimator="fd", eps=1e-5)
    flat_a = torch.cat([v.reshape(-1) for v in a.values()])
    flat_b = torch.cat([v.reshape(-1) for v in b.values()])
    err = float((flat_a - flat_b).norm() / flat_a.norm().clamp_min(1e-300))
    R.rows.append(Check(case.name, "xi_approx sample (same eta)", "autograd (double backward)",
                        "fd of parameter gradients", float(flat_a.norm()), float(flat_b.norm()), err, "rel",
                        1e-6, "pass" if err <= 1e-6 else "FAIL", time.perf_counter() - t0, "norms shown"))

    t0 = time.perf_counter()
    B, var = implicit_noise_jacobian(model, X, y)
    r = torch.randn(B.shape[1], generator=as_generator(seed + 1), dtype=B.dtype)
    sigma2 = float((var * (B @ r) ** 2).sum())
    gen = as_generator(seed + 2)
    proj = torch.tensor([
        float(torch.cat([v.reshape(-1) for v in implicit_noise(model, X, y, generator=gen).values()]) @ r)
        for _ in range(draws)
    ], dtype=torch.float64)
    s2 = float((proj ** 2).mean())  # E[xi] = 0 exactly
    se = sigma2 * math.sqrt(2.0 / draws)  # Var(s²) <= 2σ⁴/n: Rademacher sums are platykurtic
    R.z("Cov(xi_approx) along a random direction", f"empirical ({draws} samples)",
        "exact sum_u Var(eta) b_u b_u^T", s2, sigma2, se, t0)

    # 6. symbolic route
    if symbolic is not None and case.spec is not None:
        try:
            t0 = time.perf_counter()
            sym = symbolic(case.spec)
            secs = time.perf_counter() - t0
            for key, ours in (("R_approx_weighted", exact), ("R_taylor", taylor)):
                if key in sym:
                    R.rel(key.replace("_weighted", " (weighted)"), "torch exact", "SymPy (derivations)",
                          ours, float(sym[key]), 1e-9, t0, f"derived in {secs:.2f}s")
            if "R_drop_exact" in sym and bernoulli and units <= ENUM_LIMIT:
                ex = dropout_gap(model, X, y, exact=True, max_units=ENUM_LIMIT).value
                R.rel("R_drop (exact)", "torch enumeration", "SymPy (derivations)", ex,
                      float(sym["R_drop_exact"]), 1e-9, t0, f"derived in {secs:.2f}s")
            if "first_order" in sym:
                R.rel("lim R_drop/q (first-order coefficient)", "torch deletions sum Delta_ik",
                      "SymPy q-series of the exact gap", float(first_order_gap(model, X, y)),
                      sym["first_order"], 1e-9, t0, f"derived in {secs:.2f}s")
        except Exception as exc:  # the symbolic route is optional; say why it is missing
            R.skip("symbolic route", "torch", "SymPy", f"{type(exc).__name__}: {exc}")
    return R.rows


def summarize(rows: list[Check]) -> dict:
    return {
        "checks": len(rows),
        "passed": sum(r.status == "pass" for r in rows),
        "failed": sum(r.status == "FAIL" for r in rows),
        "skipped": sum(r.status == "skip" for r in rows),
    }


def format_table(rows: list[Check]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.6g}"

    head = ["case", "quantity", "route A", "route B", "A", "B", "error", "tol", "status", "s"]
    body = [
        [r.case, r.quantity, r.route_a, r.route_b, fmt(r.value_a), fmt(r.value_b),
         "-" if r.error is None else f"{r.metric} {r.error:.2e}", f"{r.tolerance:g}", r.status, f"{r.seconds:.2f}"]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    notes = [f"  [{r.case}] {r.quantity}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))
