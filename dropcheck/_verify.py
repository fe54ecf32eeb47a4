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
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from . import _reference as ref
from ._analytic import as_generator
from ._cases import Case
from ._common import fd_step_and_tolerance
from ._explicit import clean_forward, explicit_regularizer, taylor_regularizer
from ._gap import dropout_gap, first_order_gap
from ._implicit import implicit_noise, implicit_noise_jacobian
from ._precision import compute_dtype
from ._errors import DropcheckError
from ._site_api import with_drop_probability
from ._sites import BERNOULLI

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


def activation_elements(model, X, y) -> int:
    """Floating-point elements of every module output in one analytic forward
    pass: the memory one reverse pass through the model holds, the unit of
    the size guards below."""
    total = [0]

    def count(m, args, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                total[0] += t.numel()

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            clean_forward(model, X, y)
    finally:
        handle.remove()
    return max(total[0], 1)


# Size guards (elements, float64 = 8 bytes): a route runs only where its true
# size fits; otherwise the check is reported as "skip" with the size.
DENSE_ELEMS = 1 << 24  # dense J (N·c·D), C and Hessian (D²), and the vmapped backward (N·c·activations)
EXACT_ELEMS = 1 << 27  # the exact estimators: N·c (or units) backward passes over the activations
TAINT_LIMIT = 4096  # forward passes spent grouping units before an exact enumeration


@dataclass
class _Ctx:
    """One case under check: the model, its data, the recorder and the sizes
    that decide which references are affordable."""

    name: str
    model: torch.nn.Module
    X: object
    y: torch.Tensor
    R: "_Recorder"
    draws: int
    seed: int
    N: int
    c: int
    act: int  # activation elements (activation_elements)
    biggest: int  # the largest site input
    units: int  # noise units over all sites
    bernoulli: bool
    functional: bool

    @property
    def dense_size(self) -> int:
        return max(self.N * self.c * self.biggest + self.biggest * self.biggest, self.N * self.c * self.act,
                   self.biggest * self.act)

    @property
    def dense_ok(self) -> bool:
        return self.biggest <= DENSE_LIMIT and self.dense_size <= DENSE_ELEMS

    def exact_ok(self, max_units: int) -> bool:
        return self.N * self.c * self.act <= EXACT_ELEMS and max_units * self.act <= EXACT_ELEMS


def _guarded(ctx: _Ctx, quantity, a_name, b_name, fn):
    """Run one check; an exception becomes a FAIL row with its message."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:
        ctx.R.rows.append(Check(ctx.name, quantity, a_name, b_name, None, None, None, "-", 0.0, "FAIL",
                                time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"))
        return None


def _per_site_vs_dense(ctx: _Ctx, quantity, a_name, b_name, ours_fn, dense_fn, exact_ok: bool):
    """Per-site values against a dense torch.func route; returns our total."""
    model, X, y, R = ctx.model, ctx.X, ctx.y, ctx.R
    t0 = time.perf_counter()
    if not exact_ok:
        R.skip(quantity, a_name, b_name, f"N*c*activations = {ctx.N * ctx.c * ctx.act} > {EXACT_ELEMS}")
        return None
    ours = {k: _f(v) for k, v in ours_fn(model, X, y, per_site=True).items()}
    if not ctx.dense_ok:
        R.skip(quantity, a_name, b_name, f"numel(h)={ctx.biggest} (limit {DENSE_LIMIT}), dense size "
               f"{ctx.dense_size} (limit {DENSE_ELEMS})")
    else:
        dense = dense_fn(model, X, y)
        worst = max(rel_err(ours[k], dense[k], 1e-15) for k in dense)
        tol, note = _route_tolerance(ctx)
        R.rows.append(Check(ctx.name, quantity, a_name, b_name, sum(ours.values()), sum(dense.values()),
                            worst, "rel", tol, "pass" if worst <= tol else "FAIL", time.perf_counter() - t0, note))
    return sum(ours.values())


def _check_unbiased(ctx: _Ctx, exact: Optional[float]) -> None:
    """The sampled and Hutchinson estimators against the exact value, or
    against each other when the exact one is too large."""
    model, X, y, R, draws = ctx.model, ctx.X, ctx.y, ctx.R, ctx.draws
    stats = {}
    for est in ("sampled", "hutchinson"):
        t0 = time.perf_counter()
        m, se = _draws(lambda g: _f(explicit_regularizer(model, X, y, estimator=est, generator=g)), draws, ctx.seed)
        stats[est] = (m, se, t0)
        if exact is not None:
            R.z(f"R_approx {est} estimator", f"{est} ({draws} draws)", "exact", m, exact, se, t0)
    if exact is None:
        (ms, ss, t0), (mh, sh, _) = stats["sampled"], stats["hutchinson"]
        R.z("R_approx sampled vs hutchinson", f"sampled ({draws} draws)", f"hutchinson ({draws} draws)",
            ms, mh, math.hypot(ss, sh), t0, "exact estimator skipped (size)")


def _check_fd_vs_jvp(ctx: _Ctx) -> None:
    """The finite-difference estimator against Hutchinson's JVPs on the same probe."""
    model, X, y, seed = ctx.model, ctx.X, ctx.y, ctx.seed
    t0 = time.perf_counter()
    eps, tol, note = _fd_rule(ctx)
    fd = sum(_f(v) for v in explicit_regularizer(
        model, X, y, estimator="fd", generator=seed, eps=eps, per_site=True).values())
    hu = _f(explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed))
    ctx.R.rel("R_approx fd vs JVP, same probe", f"fd (eps={eps:.2g}, per site)", "hutchinson", fd, hu, tol, t0,
              note)


def _route_tolerance(ctx: _Ctx) -> tuple[float, str]:
    """Two exact routes (batched VJPs/HVPs vs dense matrices) agree to 1e-9
    in float64; where the model computes in a less precise dtype inside,
    to 100 of its machine epsilons (float32: 1.2e-5), with a note."""
    low = compute_dtype(ctx.model, ctx.X)
    if low == torch.float64:
        return 1e-9, ""
    return max(1e-9, 100.0 * float(torch.finfo(low).eps)), (
        f"note: the model computes in {str(low).replace('torch.', '')} inside; tolerance 100 of its epsilons")


def _fd_rule(ctx: _Ctx) -> tuple[float, float, str]:
    """Finite-difference step and tolerance from the precision the model
    actually computes in: float64 models keep ε = 1e-5 and 1e-6; a model
    with float32 inside (e.g. an RMSNorm upcast) gets float32's
    ``fd_step_and_tolerance`` and a note saying so."""
    low = compute_dtype(ctx.model, ctx.X)
    pdt = next((p.dtype for p in ctx.model.parameters() if p.is_floating_point()), low)
    if low == torch.float64:
        return 1e-5, 1e-6, "O(eps^2) bias"
    eps, tol = fd_step_and_tolerance(low)
    return eps, tol, (f"note: the {str(pdt).replace('torch.', '')} model computes in "
                      f"{str(low).replace('torch.', '')} inside, so eps and tolerance follow that precision")


def _check_gaussian_limit(ctx: _Ctx) -> None:
    """Gaussian noise: the Monte Carlo gap tends to R_taylor as q -> 0."""
    R = ctx.R
    t0 = time.perf_counter()
    m = with_drop_probability(ctx.model, 0.01, inputs=ctx.X)  # functional sites too
    gap = dropout_gap(m, ctx.X, ctx.y, samples=4000, generator=ctx.seed, antithetic=True)
    tay = _f(taylor_regularizer(m, ctx.X, ctx.y))
    R.z("Gaussian R_drop -> R_taylor as q -> 0", "MC gap, q=0.01 (antithetic)", "R_taylor",
        gap.value, tay, gap.stderr, t0, "tolerates O(q) = 5% bias", slack=0.05 * abs(tay))


def _check_gap(ctx: _Ctx) -> None:
    """Bernoulli dropout: Monte Carlo gap vs exact enumeration, then the
    first-order identity lim R_drop/q = Σ Δ_ik."""
    model, X, y, R = ctx.model, ctx.X, ctx.y, ctx.R
    if not ctx.bernoulli:
        _check_gaussian_limit(ctx)
        return
    if ctx.units > TAINT_LIMIT:
        R.skip("R_drop", "Monte Carlo", "exact enumeration", f"{ctx.units} noise units > {TAINT_LIMIT} to group")
        return
    t0 = time.perf_counter()
    try:
        ex = dropout_gap(model, X, y, exact=True, max_units=ENUM_LIMIT)
    except DropcheckError as exc:
        R.skip("R_drop", "Monte Carlo", "exact enumeration", str(exc))
        return
    mc = dropout_gap(model, X, y, samples=2000, generator=ctx.seed, control_variate=True)
    R.z("R_drop", "Monte Carlo (2000, control variate)", f"exact enumeration ({ex.samples} masks)",
        mc.value, ex.value, mc.stderr, t0)
    t0 = time.perf_counter()
    q0 = 1e-4
    m = with_drop_probability(model, q0, inputs=X)  # functional sites too
    ex0 = dropout_gap(m, X, y, exact=True, max_units=ENUM_LIMIT).value / q0
    lim = first_order_gap(m, X, y)
    R.rel("lim R_drop/q = sum Delta_ik", f"exact R_drop/q at q={q0}", "sum of deletions Delta_ik",
          ex0, lim, 1e-2, t0, "error O(q)")


def _check_xi_same_eta(ctx: _Ctx) -> None:
    """One ξ_approx sample by double backward and by finite differences, same η."""
    model, X, y, seed = ctx.model, ctx.X, ctx.y, ctx.seed
    t0 = time.perf_counter()
    a = implicit_noise(model, X, y, generator=seed)
    eps, tol, note = _fd_rule(ctx)
    b = implicit_noise(model, X, y, generator=seed, estimator="fd", eps=eps)
    flat_a = torch.cat([v.reshape(-1) for v in a.values()])
    flat_b = torch.cat([v.reshape(-1) for v in b.values()])
    err = float((flat_a - flat_b).norm() / flat_a.norm().clamp_min(1e-300))
    ctx.R.rows.append(Check(ctx.name, "xi_approx sample (same eta)", "autograd (double backward)",
                            "fd of parameter gradients", float(flat_a.norm()), float(flat_b.norm()), err, "rel",
                            tol, "pass" if err <= tol else "FAIL", time.perf_counter() - t0,
                            "norms shown" + ("; " + note if note.startswith("note") else "")))


def _check_xi_cov(ctx: _Ctx) -> None:
    """The empirical covariance of ξ_approx along a random direction against
    the exact Σ_u Var(η_u) b_u b_uᵀ."""
    model, X, y, R, draws, seed = ctx.model, ctx.X, ctx.y, ctx.R, ctx.draws, ctx.seed
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if ctx.units * n_params > DENSE_ELEMS or ctx.units * ctx.act > EXACT_ELEMS:
        R.skip("Cov(xi_approx) along a random direction", "empirical", "exact sum_u Var(eta) b_u b_u^T",
               f"{ctx.units} units x {n_params} parameters too large for the dense b_u")
        return
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


def _check_symbolic(ctx: _Ctx, symbolic: Callable, spec, exact: Optional[float], taylor: Optional[float]) -> None:
    """The SymPy route (``derivations/``) for the cases that have a spec; it is
    optional, so a failure is a skip that says why."""
    model, X, y, R = ctx.model, ctx.X, ctx.y, ctx.R
    try:
        t0 = time.perf_counter()
        sym = symbolic(spec)
        secs = time.perf_counter() - t0
        for key, ours in (("R_approx_weighted", exact), ("R_taylor", taylor)):
            if key in sym and ours is not None:
                R.rel(key.replace("_weighted", " (weighted)"), "torch exact", "SymPy (derivations)",
                      ours, float(sym[key]), 1e-9, t0, f"derived in {secs:.2f}s")
        if "R_drop_exact" in sym and ctx.bernoulli and ctx.units <= ENUM_LIMIT:
            ex = dropout_gap(model, X, y, exact=True, max_units=ENUM_LIMIT).value
            R.rel("R_drop (exact)", "torch enumeration", "SymPy (derivations)", ex,
                  float(sym["R_drop_exact"]), 1e-9, t0, f"derived in {secs:.2f}s")
        if "first_order" in sym:
            R.rel("lim R_drop/q (first-order coefficient)", "torch deletions sum Delta_ik",
                  "SymPy q-series of the exact gap", float(first_order_gap(model, X, y)),
                  sym["first_order"], 1e-9, t0, f"derived in {secs:.2f}s")
    except Exception as exc:  # the symbolic route is optional; say why it is missing
        R.skip("symbolic route", "torch", "SymPy", f"{type(exc).__name__}: {exc}")


def run_case(case: Case, *, draws: int = 300, seed: int = 0, symbolic: Optional[Callable] = None) -> list[Check]:
    """All checks for one case (model, inputs, targets).  A check whose route
    raises is recorded as ``FAIL`` with the error (never a traceback); a
    route too large for its dense or exact reference is ``skip`` with its
    size."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise DropcheckError(f"draws must be an integer >= 2 (a standard error needs two draws), got {draws!r}")
    R = _Recorder(case.name)
    model, X, y = case.model, case.inputs, case.targets
    try:
        with torch.no_grad():
            Z, _, occs = clean_forward(model, X, y)
        act = activation_elements(model, X, y)
    except Exception as exc:  # the model cannot be analysed at all: one row says why
        R.rows.append(Check(case.name, "analytic forward pass", "dropcheck", "-", None, None, None, "-", 0.0,
                            "FAIL", 0.0, f"{type(exc).__name__}: {exc}"))
        return R.rows
    N, c = Z.shape
    ctx = _Ctx(case.name, model, X, y, R, draws, seed, N, c, act, biggest=max(o.h.numel() for o in occs),
               units=sum(o.units for o in occs), bernoulli=all(o.site.noise == BERNOULLI for o in occs),
               functional=any(o.site.functional for o in occs))
    exact_ok = ctx.exact_ok(max(o.units for o in occs))

    # 1-2. exact estimator vs dense Jacobian route; Taylor term vs dense Hessian
    dense_routes = {}
    for key, quantity, a_name, b_name, ours_fn, dense_fn in (
        ("exact", "R_approx (weighted, per site)", "exact (batched VJPs)", "dense J^T H J with C (torch.func)",
         explicit_regularizer, ref.dense_explicit),
        ("taylor", "R_taylor (weighted, per site)", "exact (batched HVPs)", "dense Hessian with C (torch.func)",
         taylor_regularizer, ref.dense_taylor),
    ):
        dense_routes[key] = _guarded(ctx, quantity, a_name, b_name, lambda: _per_site_vs_dense(
            ctx, quantity, a_name, b_name, ours_fn, dense_fn, exact_ok))
    exact, taylor = dense_routes["exact"], dense_routes["taylor"]
    if case.linear_after_sites and exact is not None and taylor is not None:
        t0 = time.perf_counter()
        R.rel("R_taylor = weighted R_approx (only softmax after sites)", "taylor_regularizer",
              "explicit_regularizer", taylor, exact, 1e-10, t0)

    # 3. unbiased estimators; 4. dropout gap; 5. implicit noise
    _guarded(ctx, "R_approx sampled/hutchinson estimators", "Monte Carlo", "exact", lambda: _check_unbiased(ctx, exact))
    _guarded(ctx, "R_approx fd vs JVP, same probe", "fd (per site)", "hutchinson",
             lambda: _check_fd_vs_jvp(ctx))
    _guarded(ctx, "R_drop", "Monte Carlo", "exact enumeration", lambda: _check_gap(ctx))
    _guarded(ctx, "xi_approx sample (same eta)", "autograd (double backward)", "fd of parameter gradients",
             lambda: _check_xi_same_eta(ctx))
    _guarded(ctx, "Cov(xi_approx) along a random direction", "empirical", "exact sum_u Var(eta) b_u b_u^T",
             lambda: _check_xi_cov(ctx))

    # 6. symbolic route
    if symbolic is not None and case.spec is not None:
        _check_symbolic(ctx, symbolic, case.spec, exact, taylor)
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
