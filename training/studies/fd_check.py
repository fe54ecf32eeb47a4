"""Do the finite-difference estimators agree with the exact ones in float32
(and TF32) on the fused LSTM?  ``python -m training.studies.fd_check --device cuda``.

On a small AWD-LSTM (every dropout group on, q = 0.4, rows 0.1) and one
batch, the reference is computed on the CPU in float64 on the loop LSTM
with exact autograd: ``R_approx`` by the exact estimator, its parameter gradient by
double backward, ``ξ_approx`` by double backward.  Then, for each precision
setting, a copy of the model in that dtype on the *fused* backend (cuDNN on
CUDA, as the fd rules run in training) gives ``S`` independent samples of

- ``R̂_fd`` (``dc.explicit_regularizer(estimator="fd")``) and its gradient;
- the gradient of ``dc.analytic_dropout_objective`` (the shared-probe fast
  path), whose mean is ``∇(L + R_approx)`` since ``ξ`` has mean 0;
- ``ξ̂_fd`` with the same generator seed as an autograd ``ξ`` of the same
  dtype (loop LSTM, TF32 off), so the same ``η`` (a per-draw comparison,
  no statistics needed).

Statistics: for a value, ``z = (mean - exact) / stderr``; for a gradient
(a vector), ``ratio = ‖mean - exact‖² / (tr Cov / S)``, whose expectation is
1 for an unbiased estimator (``tr Cov`` from the samples); a bias larger
than the statistical error shows as a ratio well above 1.  Pass: ``|z| < 4``,
``ratio < 9`` (3 sigma even if one direction dominates), per-draw relative
error of ``ξ̂_fd`` below 0.1.

Precision settings (CUDA): ``fp32-strict`` (no TF32 anywhere),
``fp32-default`` (torch's defaults: cuDNN may use TF32, matmuls not; what a
training run gets), ``tf32`` (TF32 for matmuls and cuDNN); on CPU
``float32``.  ``float64`` runs too, as the control.  Writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import dropcheck as dc

from ..models.awd_lstm import AWDLSTM, StatefulLM
from ..pipeline.trainer import device_name


def _setting(name: str):
    """(dtype, matmul tf32, cudnn tf32 or None for torch's default)."""
    return {
        "float64": (torch.float64, False, False),
        "float32": (torch.float32, False, False),
        "fp32-strict": (torch.float32, False, False),
        "fp32-default": (torch.float32, None, None),
        "tf32": (torch.float32, True, True),
    }[name]


def _flat(d: dict, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1).double() for n in names])


def _model(V, emb, hidden, layers, backend, device, dtype, state=None):
    torch.manual_seed(0)
    lm = AWDLSTM(V, emb, hidden, layers, q_embedding=0.4, q_hidden=0.4, q_output=0.4, q_weights=0.4, q_rows=0.1,
                 backend=backend)
    with torch.no_grad():  # tied embedding ±0.8 instead of ±0.1: logits of order 1, p far from uniform
        lm.encoder.weight.mul_(8.0)
    if state is not None:
        lm.load_state_dict(state)
    return StatefulLM(lm.to(device=device, dtype=dtype))


def _hidden(lm, B, device, dtype):
    g = torch.Generator().manual_seed(7)
    return [
        tuple((0.3 * torch.randn(B, r.n_out, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
              for _ in range(2))
        for r in lm.rnns
    ]


def _vector_stat(samples: torch.Tensor, exact: torch.Tensor) -> dict:
    S = samples.shape[0]
    mean = samples.mean(0)
    tr_cov = samples.var(0, unbiased=True).sum().item()
    d2 = (mean - exact).pow(2).sum().item()
    ratio = d2 / (tr_cov / S) if tr_cov > 0 else math.inf
    return {
        "ratio": ratio,
        "rel_error_of_mean": math.sqrt(d2) / exact.norm().item(),
        "rel_stderr_of_mean": math.sqrt(tr_cov / S) / exact.norm().item(),
        "pass": ratio < 9.0,
    }


def _reference(x, y, settings, size: dict, xi_draws: int, dev) -> dict:
    """The float64 reference on the CPU (deterministic, wherever the samples
    run): loop LSTM, exact autograd (the exact estimator's gradient needs a
    double backward).  ξ references by double backward, one per dtype: the
    Rademacher signs depend on the dtype of the uniform draws (made on the
    CPU generator whatever the device), so the fd samples are compared with
    an autograd ξ of their own dtype (same η)."""
    cpu = torch.device("cpu")
    V, B = size["V"], size["B"]
    dims = (V, size["emb"], size["hidden"], size["layers"])
    ref = _model(*dims, "loop", cpu, torch.float64)
    ref.hidden = _hidden(ref.lm, B, cpu, torch.float64)
    names = [n for n, _ in ref.named_parameters()]
    params = [p for _, p in ref.named_parameters()]
    state = {k: v.detach().clone() for k, v in ref.lm.state_dict().items()}
    t0 = time.perf_counter()
    R = dc.explicit_regularizer(ref, x, y, estimator="exact")
    gR = torch.cat([g.reshape(-1) for g in torch.autograd.grad(R, params)]).to(dev)
    with dc.analytic_mode(ref, None):
        L = torch.nn.functional.cross_entropy(ref(x).reshape(-1, V), y.reshape(-1))
    gL = torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, params)]).to(dev)
    xi_ref = {}
    for dtype in sorted({_setting(n)[0] for n in settings}, key=str):
        mref = _model(*dims, "loop", cpu, dtype, state)
        mref.hidden = _hidden(mref.lm, B, cpu, dtype)
        xi_ref[dtype] = [_flat(dc.implicit_noise(mref, x, y, generator=1000 + j), names).to(dev)
                         for j in range(xi_draws)]
    return {"R": R.item(), "L": L.item(), "gR": gR, "gL": gL, "xi": xi_ref, "names": names, "state": state,
            "seconds": time.perf_counter() - t0}


def _check_setting(name: str, ref: dict, x, y, size: dict, samples: int, xi_draws: int, dev) -> dict:
    """``samples`` fd draws of one precision setting against the reference
    (TF32 flags set by the caller)."""
    dtype = _setting(name)[0]
    t0 = time.perf_counter()
    m = _model(size["V"], size["emb"], size["hidden"], size["layers"], "fused", dev, dtype, ref["state"])
    m.hidden = _hidden(m.lm, size["B"], dev, dtype)
    ps = [p for _, p in m.named_parameters()]
    vals, grads, sgrads = [], [], []
    for s in range(samples):
        r = dc.explicit_regularizer(m, x, y, estimator="fd", generator=s)
        vals.append(r.item())
        grads.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(r, ps)]))
        obj = dc.analytic_dropout_objective(m, x, y, generator=10_000 + s).objective
        sgrads.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(obj, ps)]))
    v = torch.tensor(vals, dtype=torch.float64)
    se = v.std(unbiased=True).item() / math.sqrt(samples)
    z = (v.mean().item() - ref["R"]) / se if se > 0 else math.inf
    xi_err = []
    for j in range(xi_draws):
        xi = _flat(dc.implicit_noise(m, x, y, estimator="fd", generator=1000 + j), ref["names"])
        xr = ref["xi"][dtype][j]
        xi_err.append(((xi - xr).norm() / xr.norm()).item())
    xi_med = sorted(xi_err)[len(xi_err) // 2]
    res = {
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "backend": "cuDNN" if dev.type == "cuda" else "ATen LSTM (cpu)",
        "R_fd": {"mean": v.mean().item(), "stderr": se, "z": z, "rel_bias": v.mean().item() / ref["R"] - 1,
                 "pass": abs(z) < 4.0},
        "grad_R_fd": _vector_stat(torch.stack(grads), ref["gR"]),
        "grad_shared_objective": _vector_stat(torch.stack(sgrads), ref["gL"] + ref["gR"]),
        "xi_fd_rel_error": {"median": xi_med, "max": max(xi_err), "pass": xi_med < 0.1},
        "seconds": time.perf_counter() - t0,
    }
    res["pass"] = all(res[k]["pass"] for k in ("R_fd", "grad_R_fd", "grad_shared_objective", "xi_fd_rel_error"))
    return res


def check(device: str = "cpu", samples: int = 200, settings=None, *, V=30, emb=16, hidden=32, layers=2, T=8, B=4,
          xi_draws=8) -> dict:
    dev = torch.device(device)
    if settings is None:
        settings = ["float64", "fp32-strict", "fp32-default", "tf32"] if dev.type == "cuda" else ["float64", "float32"]
    size = {"V": V, "emb": emb, "hidden": hidden, "layers": layers, "T": T, "B": B}
    x = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(2))
    ref = _reference(x, y, settings, size, xi_draws, dev)
    out = {
        "reference": {"where": "cpu, float64 (xi: per dtype), loop LSTM, exact autograd", "R_exact": ref["R"],
                      "loss": ref["L"], "grad_norm_R": ref["gR"].norm().item(), "seconds": ref["seconds"]},
        "settings": {},
    }
    x, y = x.to(dev), y.to(dev)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for name in settings:
            _, mm, cud = _setting(name)
            torch.backends.cuda.matmul.allow_tf32 = saved[0] if mm is None else mm
            torch.backends.cudnn.allow_tf32 = saved[1] if cud is None else cud
            out["settings"][name] = _check_setting(name, ref, x, y, size, samples, xi_draws, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    out.update(
        {
            "device": str(dev),
            "device_name": device_name(dev),
            "torch": torch.__version__,
            "samples": samples,
            "model": size,
            "pass": all(s["pass"] for s in out["settings"].values()),
        }
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.studies.fd_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--settings", default=None, help="comma-separated (float64, float32, fp32-strict, fp32-default, tf32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tinier model (a dry run of the plumbing)")
    p.add_argument("--out", default=None, help="JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = dict(V=12, emb=6, hidden=8, T=5, B=2) if a.tiny else {}
    res = check(a.device, a.samples, a.settings.split(",") if a.settings else None, **size)
    print(f"reference (float64, loop LSTM, exact): R = {res['reference']['R_exact']:.6g}")
    print(f"{'setting':14s} {'R_fd z':>8s} {'rel bias':>9s} {'grad R ratio':>13s} {'shared ratio':>13s} {'xi rel err':>11s}  pass")
    for name, s in res["settings"].items():
        print(f"{name:14s} {s['R_fd']['z']:8.2f} {s['R_fd']['rel_bias']:9.2e} {s['grad_R_fd']['ratio']:13.2f} "
              f"{s['grad_shared_objective']['ratio']:13.2f} {s['xi_fd_rel_error']['median']:11.2e}  {s['pass']}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
