"""Network specs and reference values for one case: :func:`build_case`.

A *spec* is a plain dict (JSON-able)::

    {
      "name": "d2-tanh-in-hid",              # optional, free text
      "sizes": [d0, d1, ..., c],              # d0 inputs, c >= 2 classes
      "activations": ["tanh", ...],           # one per hidden layer (len(sizes) - 2):
                                              #   tanh | sigmoid | softplus | identity
      "sites": [{"layer": k, "q": 0.1}, ...], # dropout on h_k (0 = input, k < depth),
                                              #   after the activation, before Linear k+1;
                                              #   0 < q < 1; at most one site per layer
      "params": [{"weight": [[...]], "bias": [...]}, ...],  # Linear 1..depth,
                                              #   weight (out, in) as in torch
      "X": [[...], ...],                      # n × d0 inputs
      "y": [0, 2, ...]                        # n labels in [0, c)
    }

Values are means over the ``n`` examples; every example has its own masks.
The matching torch model (``torch_layout``) is
``nn.Sequential([Dropout(q)], Linear, act, [Dropout(q)], Linear, ...)``:
for each weight layer ``l = 1..depth``, a ``Dropout`` if layer ``l-1`` is a
site, the ``Linear``, then the activation module if ``l < depth``
(``nn.Identity`` for ``identity``).  Each site's ``"torch_name"`` in the
output is its index in that ``Sequential``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Optional, Sequence

import numpy as np
import sympy as sp

from .network import ACTIVATIONS, Derivation, Shape, derive, is_cached, masks
from .noise import derived_lambda, eta_law, eta_moment, eta_variance

__all__ = [
    "SpecError",
    "normalize_spec",
    "spec_shape",
    "torch_layout",
    "random_spec",
    "build_case",
    "evaluate",
    "expressions",
    "exact_gap",
    "RATIO_QS",
    "MAX_UNITS",
]

#: q values at which every case reports R_drop / R_taylor (all sites at that q).
RATIO_QS = (0.01, 0.05, 0.1)
#: exact enumeration limit (2^M masks per example).
MAX_UNITS = 12


class SpecError(ValueError):
    """A network spec that does not describe a supported case."""


def _numbers(a, what: str) -> None:
    """Every entry of the nested lists ``a`` is a number (not a string or bool)."""
    if isinstance(a, (list, tuple)):
        for x in a:
            _numbers(x, what)
    elif isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)):
        raise SpecError(f"{what} must hold numbers only, got {a!r}")


def _finite_matrix(a, shape, what) -> list:
    _numbers(a, what)
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # a ragged list
        raise SpecError(f"{what} must be numbers of shape {tuple(shape)}: {exc}") from None
    if arr.shape != tuple(shape):
        raise SpecError(f"{what} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise SpecError(f"{what} contains non-finite values")
    return arr.tolist()


def normalize_spec(spec: dict, *, max_units: int = MAX_UNITS) -> dict:
    """Check ``spec`` and return a normalized copy (floats, sorted sites)."""
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in ("sizes", "sites", "params", "X", "y") if k not in spec]
    if missing:
        raise SpecError(f"spec is missing {missing}; expected keys sizes, activations, sites, params, X, y")
    unknown = set(spec) - {"name", "sizes", "activations", "sites", "params", "X", "y", "note"}
    if unknown:
        raise SpecError(f"spec has unknown keys {sorted(unknown)}")
    sizes = spec["sizes"]
    if (
        not isinstance(sizes, (list, tuple))
        or len(sizes) < 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in sizes)
    ):
        raise SpecError(f"sizes must be a list [d0, ..., c] of >= 2 positive integers, got {sizes!r}")
    sizes = [int(v) for v in sizes]
    depth = len(sizes) - 1
    if sizes[-1] < 2:
        raise SpecError(f"the number of classes c = sizes[-1] must be >= 2, got {sizes[-1]}")
    acts = list(spec.get("activations", []))
    if len(acts) != depth - 1:
        raise SpecError(f"need {depth - 1} activation name(s) for {depth} weight layers, got {acts!r}")
    for a in acts:
        if a not in ACTIVATIONS:
            raise SpecError(f"unknown activation {a!r}; expected one of {sorted(ACTIVATIONS)}")
    sites_in = spec["sites"]
    if not isinstance(sites_in, (list, tuple)) or not sites_in:
        raise SpecError("sites must be a non-empty list of {'layer': k, 'q': value}")
    sites = []
    for s in sites_in:
        if not isinstance(s, dict) or set(s) - {"layer", "q"} or "layer" not in s or "q" not in s:
            raise SpecError(f"each site must be {{'layer': k, 'q': value}}, got {s!r}")
        k, q = s["layer"], s["q"]
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < depth:
            raise SpecError(f"site layer must be an integer in [0, {depth}) (h_0 = input), got {k!r}")
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)):
            raise SpecError(f"site q must be a number in (0, 1), got {q!r}")
        q = float(q)
        if not (0.0 < q < 1.0):
            raise SpecError(f"site q must lie in (0, 1), got {s['q']!r}")
        sites.append({"layer": int(k), "q": q})
    layers = [s["layer"] for s in sites]
    if len(set(layers)) != len(layers):
        raise SpecError(f"at most one site per layer, got layers {layers}")
    sites.sort(key=lambda s: s["layer"])
    M = sum(sizes[s["layer"]] for s in sites)
    if M > max_units:
        raise SpecError(f"{M} dropped units per example exceed max_units={max_units} (2^{M} masks)")
    params_in = spec["params"]
    if not isinstance(params_in, (list, tuple)) or len(params_in) != depth:
        raise SpecError(f"params must list {depth} layers of {{'weight', 'bias'}}")
    params = []
    for l, p in enumerate(params_in, start=1):
        if not isinstance(p, dict) or set(p) != {"weight", "bias"}:
            raise SpecError(f"params[{l - 1}] must be {{'weight': [[...]], 'bias': [...]}}")
        params.append(
            {
                "weight": _finite_matrix(p["weight"], (sizes[l], sizes[l - 1]), f"params[{l - 1}].weight"),
                "bias": _finite_matrix(p["bias"], (sizes[l],), f"params[{l - 1}].bias"),
            }
        )
    _numbers(spec["X"], "X")
    try:
        X = np.asarray(spec["X"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"X must be an n × {sizes[0]} matrix of numbers: {exc}") from None
    if X.ndim != 2 or X.shape[1] != sizes[0] or X.shape[0] < 1:
        raise SpecError(f"X must be n × d0 = n × {sizes[0]} with n >= 1, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise SpecError("X contains non-finite values")
    y = spec["y"]
    if not isinstance(y, (list, tuple)) or len(y) != X.shape[0]:
        raise SpecError(f"y must list {X.shape[0]} labels")
    for v in y:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < sizes[-1]:
            raise SpecError(f"labels must be integers in [0, {sizes[-1]}), got {v!r}")
    out = {
        "name": str(spec.get("name", "")),
        "sizes": sizes,
        "activations": acts,
        "sites": sites,
        "params": params,
        "X": X.tolist(),
        "y": [int(v) for v in y],
    }
    if "note" in spec:
        out["note"] = str(spec["note"])
    return out


def spec_shape(spec: dict) -> Shape:
    return Shape(tuple(spec["sizes"]), tuple(spec["activations"]), tuple(s["layer"] for s in spec["sites"]))


def torch_layout(spec: dict) -> list:
    """Module list of the matching ``nn.Sequential`` (module docstring):
    ``[("dropout", q) | ("linear", l) | ("act", name)]``."""
    depth = len(spec["sizes"]) - 1
    q_of = {s["layer"]: s["q"] for s in spec["sites"]}
    mods = []
    for l in range(1, depth + 1):
        if (l - 1) in q_of:
            mods.append(("dropout", q_of[l - 1]))
        mods.append(("linear", l))
        if l < depth:
            mods.append(("act", spec["activations"][l - 1]))
    return mods


def random_spec(
    sizes: Sequence[int],
    activations: Sequence[str],
    sites: Sequence[dict],
    *,
    n: int = 1,
    seed: int = 0,
    weight_scale: float = 1.0,
    input_scale: float = 1.0,
    name: str = "",
) -> dict:
    """A spec with concrete numbers drawn from ``numpy.random.default_rng(seed)``:
    weights ``N(0, weight_scale²/fan_in)``, biases ``N(0, 0.1²)``, inputs
    ``N(0, input_scale²)``, labels uniform."""
    rng = np.random.default_rng(seed)
    sizes = [int(v) for v in sizes]
    params = []
    for l in range(1, len(sizes)):
        W = rng.normal(0.0, weight_scale / math.sqrt(sizes[l - 1]), (sizes[l], sizes[l - 1]))
        params.append({"weight": W.tolist(), "bias": rng.normal(0.0, 0.1, sizes[l]).tolist()})
    X = rng.normal(0.0, input_scale, (n, sizes[0]))
    y = rng.integers(0, sizes[-1], n)
    return normalize_spec(
        {
            "name": name,
            "sizes": sizes,
            "activations": list(activations),
            "sites": [dict(s) for s in sites],
            "params": params,
            "X": X.tolist(),
            "y": [int(v) for v in y],
        }
    )


# ---------------------------------------------------------------------------
# numerical evaluation of the compiled symbolic functions


def _theta(spec: dict) -> np.ndarray:
    parts = []
    for p in spec["params"]:
        parts.append(np.asarray(p["weight"], dtype=np.float64).reshape(-1))
        parts.append(np.asarray(p["bias"], dtype=np.float64).reshape(-1))
    return np.concatenate(parts)


def _onehot(y: int, c: int) -> np.ndarray:
    e = np.zeros(c)
    e[y] = 1.0
    return e


class _Example:
    """One example's compiled-function values (at η = 0) and loss oracle."""

    def __init__(self, d: Derivation, theta, x, y):
        c = d.shape.classes
        self.d = d
        self.theta, self.x = theta, np.asarray(x, dtype=np.float64)
        self.e = _onehot(y, c)
        zero = np.zeros(d.M)
        z0 = np.asarray(d.funcs["logits"](theta, self.x, zero), dtype=np.float64)
        self.s = float(np.max(z0))
        out = d.funcs["point"](theta, self.x, self.e, self.s, zero, 0.0)
        self.v = {}
        for name, val in zip(_POINT_NAMES, out):
            self.v[name] = val
        P = len(d.theta)
        self.v["B"] = np.array([[float(b) for b in row] for row in self.v["B"]], dtype=np.float64).reshape(d.M, P)
        for k in ("logits", "loss_jacobian", "grad_eta", "taylor_u", "gauss_newton_u", "model_hessian_u", "slopes"):
            self.v[k] = np.array([float(t) for t in self.v[k]], dtype=np.float64)
        self.v["H_out"] = np.array([[float(t) for t in row] for row in self.v["H_out"]], dtype=np.float64)
        self.v["loss"] = float(self.v["loss"])

    def loss_at(self, etas: np.ndarray) -> np.ndarray:
        """ℓ at K noise vectors ``etas`` (K, M) -> (K,)."""
        etas = np.asarray(etas, dtype=np.float64)
        val = self.d.funcs["loss"](self.theta, self.x, self.e, self.s, etas.T)
        return np.broadcast_to(np.asarray(val, dtype=np.float64), (etas.shape[0],)).copy()


_POINT_NAMES = (
    "logits",
    "loss",
    "loss_jacobian",
    "H_out",
    "grad_eta",
    "taylor_u",
    "gauss_newton_u",
    "model_hessian_u",
    "B",
    "slopes",
)


def _unit_q(d: Derivation, q_site: Sequence[float]) -> np.ndarray:
    return np.array([q_site[j] for j in d.unit_site], dtype=np.float64)


def exact_gap(d: Derivation, examples: Sequence[_Example], q_site: Sequence[float]) -> float:
    """``mean_n Σ_masks P(mask) ℓ_n(η(mask)) - ℓ_n`` over all ``2^M`` masks,
    noise values and probabilities from the derived law ``funcs["eta_law"]``."""
    bits = masks(d.M).astype(bool)
    qs = _unit_q(d, q_site)
    law = [d.funcs["eta_law"](qu) for qu in qs]  # [[η_drop, P_drop], [η_keep, P_keep]] per unit
    eta_drop = np.array([float(l[0][0]) for l in law])
    p_drop = np.array([float(l[0][1]) for l in law])
    eta_keep = np.array([float(l[1][0]) for l in law])
    p_keep = np.array([float(l[1][1]) for l in law])
    etas = np.where(bits, eta_drop, eta_keep)
    probs = np.prod(np.where(bits, p_drop, p_keep), axis=1)
    gaps = [float(np.dot(probs, ex.loss_at(etas)) - ex.v["loss"]) for ex in examples]
    return float(np.mean(gaps))


def _site_sums(d: Derivation, per_unit: np.ndarray) -> list:
    out = [0.0] * len(d.q)
    for u, j in enumerate(d.unit_site):
        out[j] += float(per_unit[u])
    return out


def _weighted(lam: Sequence[float], per_site: Sequence[float]) -> dict:
    w = [float(l) * float(v) for l, v in zip(lam, per_site)]
    return {"per_site": w, "total": float(sum(w))}


def _plain(per_site: Sequence[float]) -> dict:
    return {"per_site": [float(v) for v in per_site], "total": float(sum(per_site))}


def evaluate(d: Derivation, spec: dict) -> dict:
    """Reference values of ``spec`` from the compiled symbolic functions of
    ``d`` (see the JSON schema in :mod:`derivations`)."""
    theta = _theta(spec)
    X, y = np.asarray(spec["X"], dtype=np.float64), spec["y"]
    n = X.shape[0]
    exs = [_Example(d, theta, X[i], y[i]) for i in range(n)]
    q_site = [s["q"] for s in spec["sites"]]
    lam, var, _ = d.funcs["noise"](q_site)
    lam = [float(v) for v in lam]
    var = [float(v) for v in var]
    slope = [float(v) for v in d.noise["coef_slope_site"]]

    def mean_units(key):
        return np.mean([ex.v[key] for ex in exs], axis=0)

    taylor_unw = _site_sums(d, mean_units("taylor_u"))
    gn_unw = _site_sums(d, mean_units("gauss_newton_u"))
    mh_unw = _site_sums(d, mean_units("model_hessian_u"))

    # Δ_u by its definition: ℓ(unit u zeroed) - ℓ + h_u ∂ℓ/∂h_u, zeroing = η_u = -1
    delta = np.zeros(d.M)
    for ex in exs:
        deleted = ex.loss_at(-np.eye(d.M))
        delta += deleted - ex.v["loss"] + ex.v["grad_eta"]
    delta /= n

    # first Taylor coefficient in q of the exact gap: Σ a Λ_mask(0) + b Λ'_mask(0)
    def series_value(entries):
        total = 0.0
        law0 = d.funcs["eta_law"](0.0)
        eta_drop0, eta_keep0 = float(law0[0][0]), float(law0[1][0])
        for ex in exs:
            for bits, a_m, b_m, slope_index in entries:
                if a_m != 0:
                    eta = np.where(np.array(bits, dtype=bool), eta_drop0, eta_keep0)[None, :]
                    total += float(a_m) * float(ex.loss_at(eta)[0])
                if b_m != 0:
                    total += float(b_m) * float(ex.v["slopes"][slope_index])
        return total / n

    series_total = series_value(d.series["total"])
    series_site = [series_value(d.series[j]) for j in range(len(d.q))]
    taylor_slope_site = [s_ * t for s_, t in zip(slope, taylor_unw)]

    # implicit noise covariance of the mean loss: (1/n²) Σ_n Σ_u Var(η_u) b_u b_uᵀ
    var_u = np.array([var[j] for j in d.unit_site])
    P = len(d.theta)
    cov = np.zeros((P, P))
    for ex in exs:
        B = ex.v["B"]
        cov += B.T @ (var_u[:, None] * B)
    cov /= n * n

    R_drop = exact_gap(d, exs, q_site)
    R_taylor = _weighted(lam, taylor_unw)

    ratios = {}
    for qv in RATIO_QS:
        qs = [qv] * len(d.q)
        lam_v = [float(v) for v in d.funcs["noise"](qs)[0]]
        rd = exact_gap(d, exs, qs)
        rt = float(sum(l * t for l, t in zip(lam_v, taylor_unw)))
        ratios[repr(qv)] = {"q": qv, "R_drop_exact": rd, "R_taylor": rt, "ratio": rd / rt if rt != 0 else None}

    ref = {
        "loss": float(np.mean([ex.v["loss"] for ex in exs])),
        "logits": [ex.v["logits"].tolist() for ex in exs],
        "lambda": lam,
        "variance": var,
        "R_drop_exact": R_drop,
        "R_taylor": R_taylor["total"],
        "R_taylor_per_site": R_taylor["per_site"],
        "R_taylor_unweighted": _plain(taylor_unw),
        "R_approx": {"unweighted": _plain(gn_unw), "weighted": _weighted(lam, gn_unw)},
        "model_hessian_part": {"unweighted": _plain(mh_unw), "weighted": _weighted(lam, mh_unw)},
        "H_out": [ex.v["H_out"].tolist() for ex in exs],
        "loss_jacobian": [ex.v["loss_jacobian"].tolist() for ex in exs],
        "first_order_coefficient": series_total,
        "first_order_coefficient_per_site": series_site,
        "first_order_coefficient_delta": _plain(_site_sums(d, delta)),
        "delta_per_unit": delta.tolist(),
        "taylor_first_order_coefficient": _plain(taylor_slope_site),
        "limit_ratio": series_total / sum(taylor_slope_site) if sum(taylor_slope_site) != 0 else None,
        "implicit_cov": cov.tolist(),
    }
    return {"reference": ref, "gap_taylor_ratio": ratios}


# ---------------------------------------------------------------------------


def _expr_str(expr, limit: int) -> Optional[str]:
    s = str(expr)
    return s if len(s) <= limit else None


def expressions(d: Derivation, *, limit: int = 3000, program: bool = True) -> dict:
    """Inspectable formulas of a derivation (SymPy ``str``, parsable by
    ``sympy.sympify``, and the generated Python source of the loss program)."""
    q = sp.Symbol("q", positive=True)
    so1 = d.noise["second_order"]
    out = {
        "symbols": {
            "theta": [str(t) for t in d.theta],
            "x": [str(t) for t in d.x],
            "e": [str(t) for t in d.e],
            "s": str(d.s),
            "q": [str(t) for t in d.q],
            "eta": [str(t) for t in d.eta],
        },
        "eta_law": str(eta_law(q)),
        "E_eta": str(eta_moment(1, q)),
        "E_eta2": str(eta_moment(2, q)),
        "variance": str(eta_variance(q)),
        "lambda_derived": str(derived_lambda(q)),
        "lambda_per_site": [str(v) for v in d.noise["lambda_site"]],
        "second_order_coefficients": [str(v) for v in so1["diag"]],
        "loss_in_logits": str(d.nodes["loss_z"]),
        "loss_jacobian_in_logits": [str(v) for v in d.nodes["jac_z"]],
        "H_out_in_logits": [[str(v) for v in row] for row in d.nodes["hess_z"]],
        "first_order_series_terms": [
            [list(bits), str(a), str(b)] for bits, a, b, _ in d.series["total"]
        ],
    }
    loss_full = d.expand(d.nodes["loss"])
    out["loss_eta"] = _expr_str(loss_full, limit)
    taylor = [_expr_str(d.expand(t).xreplace({v: 0 for v in d.eta}), limit) for t in d.nodes["taylor_u"]]
    out["taylor_u_at_eta0"] = taylor if all(t is not None for t in taylor) else None
    zero = {v: 0 for v in d.eta}
    gn = [_expr_str(d.expand(t).xreplace(zero), limit) for t in d.nodes["gauss_newton_u"]]
    out["gauss_newton_u_at_eta0"] = gn if all(t is not None for t in gn) else None
    if len(d.theta) * d.M <= 60:
        b = [[_expr_str(t, limit) for t in row] for row in d.implicit_b(expand=True)]
        out["implicit_b_u"] = b if all(t is not None for row in b for t in row) else None
    else:
        out["implicit_b_u"] = None
    if program:
        out["loss_program_source"] = d.funcs["loss"].source
    return out


def build_case(spec: dict, *, cache: bool = True, with_expressions: bool = True) -> dict:
    """Derive (or fetch from the per-shape cache) and evaluate one spec.

    Returns the case dict of the JSON schema in :mod:`derivations`:
    ``name, spec, shape, sites, param_order, reference, gap_taylor_ratio,
    expressions, timing, size``.
    """
    t0 = time.perf_counter()
    spec = normalize_spec(spec)
    shape = spec_shape(spec)
    cached = cache and is_cached(shape)
    d = derive(shape, cache=cache)
    t_derive = time.perf_counter() - t0
    vals = evaluate(d, spec)
    t_eval = time.perf_counter() - t0 - t_derive
    layout = torch_layout(spec)
    site_names = [str(i) for i, m in enumerate(layout) if m[0] == "dropout"]
    case = {
        "name": spec["name"],
        "spec": spec,
        "shape": {
            "sizes": list(shape.sizes),
            "activations": list(shape.activations),
            "site_layers": list(shape.site_layers),
            "depth": shape.depth,
            "classes": shape.classes,
        },
        "sites": [
            {"layer": s["layer"], "q": s["q"], "units": shape.sizes[s["layer"]], "torch_name": nm}
            for s, nm in zip(spec["sites"], site_names)
        ],
        "param_order": [[nm, list(sh)] for nm, sh in d.param_shapes],
        **vals,
    }
    if with_expressions:
        case["expressions"] = expressions(d)
    t_total = time.perf_counter() - t0
    case["timing"] = {
        "derive_seconds": t_derive,
        "derive_seconds_uncached": d.derive_seconds,
        "derive_breakdown": d.timings,
        "cached": bool(cached),
        "evaluate_seconds": t_eval,
        "total_seconds": t_total,
    }
    case["size"] = {
        "units": d.M,
        "masks": 2**d.M,
        "params": len(d.theta),
        "examples": len(spec["y"]),
        "program_assignments": len(d.program.assigns),
        "point_function_assignments": d.funcs["point"].n_assignments,
        "json_bytes": 0,
    }
    case["size"]["json_bytes"] = len(json.dumps(case))
    return case
