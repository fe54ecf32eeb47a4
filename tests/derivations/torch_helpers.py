"""Shared pieces of the derivations tests: spec strategies, the torch model
of a spec, and tolerant comparison.

Test modules ``import torch_helpers as T`` (``tests/derivations`` is on
pytest's ``pythonpath``, see pyproject.toml).  Importing this module does not import dropcheck; only
the cross-route tests do.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

from derivations import torch_layout

RTOL = 1e-9  # symbolic vs torch, both float64
ATOL = 1e-12  # absolute floor: cancellation in saturated softmaxes (p - p²) and tiny gaps


def _softplus():
    # torch's default Softplus is linear above 20; the symbolic one is exact
    return nn.Softplus(beta=1.0, threshold=float("inf"))


TORCH_ACT = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": _softplus, "identity": nn.Identity}


def torch_model(spec: dict) -> nn.Sequential:
    """``nn.Sequential([Dropout(q)], Linear, act, ...)`` (the layout of
    :func:`derivations.torch_layout`) with float64 parameters copied from
    ``spec``; in training mode like a model being trained."""
    mods = []
    for kind, v in torch_layout(spec):
        if kind == "dropout":
            mods.append(nn.Dropout(v))
        elif kind == "linear":
            p = spec["params"][v - 1]
            W = torch.tensor(p["weight"], dtype=torch.float64)
            lin = nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(W)
                lin.bias.copy_(torch.tensor(p["bias"], dtype=torch.float64))
            mods.append(lin)
        else:
            mods.append(TORCH_ACT[v]())
    return nn.Sequential(*mods).train()


def torch_data(spec: dict):
    return torch.tensor(spec["X"], dtype=torch.float64), torch.tensor(spec["y"], dtype=torch.long)


def rel_err(a, b, atol: float = ATOL) -> float:
    """``max|a - b| / max(max|b|, atol/RTOL)``: a pass is ``<= RTOL``, i.e.
    ``max|a - b| <= max(RTOL·max|b|, atol)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, atol / RTOL)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


ACTS = ("tanh", "sigmoid", "softplus", "identity")


@st.composite
def specs(draw, max_depth: int = 2, max_width: int = 3, max_classes: int = 3, max_n: int = 2):
    """Small network specs: depth 1..max_depth, widths <= max_width,
    c in 2..max_classes, n <= max_n, >= 1 site; numbers either drawn directly
    as bounded finite floats or generated from a drawn integer seed."""
    depth = draw(st.integers(1, max_depth))
    sizes = [draw(st.integers(1, max_width)) for _ in range(depth)] + [draw(st.integers(2, max_classes))]
    acts = [draw(st.sampled_from(ACTS)) for _ in range(depth - 1)]
    layers = draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=depth, unique=True))
    qs = st.floats(0.01, 0.9, allow_nan=False, allow_infinity=False)
    sites = [{"layer": k, "q": draw(qs)} for k in sorted(layers)]
    n = draw(st.integers(1, max_n))
    y = [draw(st.integers(0, sizes[-1] - 1)) for _ in range(n)]
    if draw(st.booleans()):
        val = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
        params = [
            {
                "weight": [[draw(val) for _ in range(sizes[l - 1])] for _ in range(sizes[l])],
                "bias": [draw(val) for _ in range(sizes[l])],
            }
            for l in range(1, depth + 1)
        ]
        X = [[draw(val) for _ in range(sizes[0])] for _ in range(n)]
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        scale = draw(st.floats(0.1, 4.0))
        rng = np.random.default_rng(seed)
        params = [
            {
                "weight": (rng.normal(0, scale / np.sqrt(sizes[l - 1]), (sizes[l], sizes[l - 1]))).tolist(),
                "bias": rng.normal(0, 0.3, sizes[l]).tolist(),
            }
            for l in range(1, depth + 1)
        ]
        X = rng.normal(0, 1.5, (n, sizes[0])).tolist()
    return {"sizes": sizes, "activations": acts, "sites": sites, "params": params, "X": X, "y": y}


def saturated_spec() -> dict:
    """Depth 2, logits apart by ~25: p_y ≈ 1 - 1e-11 (a saturated softmax)."""
    return {
        "name": "saturated",
        "sizes": [2, 2, 2],
        "activations": ["tanh"],
        "sites": [{"layer": 0, "q": 0.2}, {"layer": 1, "q": 0.3}],
        "params": [
            {"weight": [[2.0, -1.0], [0.5, 1.5]], "bias": [0.1, -0.2]},
            {"weight": [[14.0, 9.0], [-10.0, -4.0]], "bias": [1.0, -1.0]},
        ],
        "X": [[1.0, 0.5], [0.8, 1.2]],
        "y": [0, 0],
    }


def tiny_q_spec() -> dict:
    """Depth 2 with q near 0 at both sites."""
    return {
        "name": "tiny-q",
        "sizes": [2, 3, 2],
        "activations": ["sigmoid"],
        "sites": [{"layer": 0, "q": 1e-4}, {"layer": 1, "q": 1e-3}],
        "params": [
            {"weight": [[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]], "bias": [0.0, 0.1, -0.1]},
            {"weight": [[1.5, -2.0, 0.7], [-0.4, 1.1, 0.9]], "bias": [0.2, -0.3]},
        ],
        "X": [[0.7, -1.1]],
        "y": [1],
    }


def last_linear_spec() -> dict:
    """The only site is the input of the last Linear: only softmax follows."""
    return {
        "name": "last-linear-only",
        "sizes": [2, 3, 3],
        "activations": ["softplus"],
        "sites": [{"layer": 1, "q": 0.35}],
        "params": [
            {"weight": [[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]], "bias": [0.0, 0.1, -0.1]},
            {"weight": [[1.5, -2.0, 0.7], [-0.4, 1.1, 0.9], [0.2, 0.2, -1.0]], "bias": [0.2, -0.3, 0.0]},
        ],
        "X": [[0.7, -1.1], [-0.3, 0.9]],
        "y": [1, 2],
    }


# ---------------------------------------------------------------------------
# cross-route values


def _f(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def torch_values(spec: dict, case: dict) -> dict:
    """Every compared quantity from dropcheck, keyed like ``case['reference']``."""
    import dropcheck as dc  # imported at test time: these tests fail (not skip) without it

    model = torch_model(spec)
    X, y = torch_data(spec)
    names = [s["torch_name"] for s in case["sites"]]

    def per_site(d):
        missing = [n for n in names if n not in d]
        assert not missing, f"dropcheck per-site keys {sorted(d)} lack {missing}"
        return [_f(d[n]) for n in names]

    out = {}
    out["R_approx.weighted.per_site"] = per_site(
        dc.explicit_regularizer(model, X, y, estimator="exact", weighted=True, per_site=True)
    )
    out["R_approx.unweighted.per_site"] = per_site(
        dc.explicit_regularizer(model, X, y, estimator="exact", weighted=False, per_site=True)
    )
    out["R_approx.weighted.total"] = _f(dc.explicit_regularizer(model, X, y, estimator="exact", weighted=True))
    out["R_approx.unweighted.total"] = _f(dc.explicit_regularizer(model, X, y, estimator="exact", weighted=False))
    out["R_taylor"] = _f(dc.taylor_regularizer(model, X, y, weighted=True))
    out["R_taylor_unweighted.total"] = _f(dc.taylor_regularizer(model, X, y, weighted=False))
    gap = dc.dropout_gap(model, X, y, exact=True)
    out["R_drop_exact"] = float(gap.value)
    out["first_order_coefficient"] = _f(dc.first_order_gap(model, X, y))
    fo_site = dc.first_order_gap(model, X, y, per_site=True)
    out["first_order_coefficient_per_site"] = per_site(fo_site)
    out["implicit_cov"] = dc.implicit_noise_covariance(model, X, y).detach().numpy()
    return out


def symbolic_values(case: dict) -> dict:
    r = case["reference"]
    return {
        "R_approx.weighted.per_site": r["R_approx"]["weighted"]["per_site"],
        "R_approx.unweighted.per_site": r["R_approx"]["unweighted"]["per_site"],
        "R_approx.weighted.total": r["R_approx"]["weighted"]["total"],
        "R_approx.unweighted.total": r["R_approx"]["unweighted"]["total"],
        "R_taylor": r["R_taylor"],
        "R_taylor_unweighted.total": r["R_taylor_unweighted"]["total"],
        "R_drop_exact": r["R_drop_exact"],
        "first_order_coefficient": r["first_order_coefficient"],
        "first_order_coefficient_per_site": r["first_order_coefficient_per_site"],
        "implicit_cov": np.asarray(r["implicit_cov"]),
    }


def disagreements(spec: dict, case: dict) -> dict:
    sym = symbolic_values(case)
    tor = torch_values(spec, case)
    return {k: rel_err(tor[k], sym[k]) for k in sym}


