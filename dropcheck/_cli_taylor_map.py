"""``dropcheck taylor-map``: plot and tabulate where dropout's second-order
picture holds, over q (and width for the built-in tanh family)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from ._cli_verify import user_case
from ._errors import DropcheckError
from ._taylor_map import DEFAULT_QS, DEFAULT_WIDTHS, MapRow, format_rows, map_model, tanh_family


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODULE:FACTORY", nargs="+",
                   help="user models (one table and plot): FACTORY() returns (model, inputs, targets); "
                        "q varies at every site")
    p.add_argument("--qs", type=float, nargs="+", default=list(DEFAULT_QS), help="drop probabilities")
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                   help="hidden widths of the built-in tanh family")
    p.add_argument("--samples", type=int, default=1000, help="Monte Carlo draws per (q, noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimator", choices=["exact", "hutchinson"], default="exact",
                   help="how R_approx and R_taylor are computed (hutchinson: for models too large for exact)")
    p.add_argument("--estimator-samples", type=int, default=200, help="probes for --estimator hutchinson (>= 10, in 10 batches; rounded down to a multiple of 10)")
    p.add_argument("--no-limit", action="store_true",
                   help="skip the q->0 limit ratio (one forward pass per noise unit)")
    p.add_argument("--out", default="taylor_map_out", help="folder for taylor_map.{csv,json,png}")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(rows: list[MapRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    keys = sorted({(r.model, r.width) for r in rows}, key=lambda k: (k[0], k[1] or 0))
    for i, noise in enumerate(("bernoulli", "gaussian")):
        for j, (ratio, err, label) in enumerate((
            ("ratio_approx", "ratio_approx_stderr", r"$R_{drop}\,/\,\lambda R_{approx}$"),
            ("ratio_taylor", "ratio_taylor_stderr", r"$R_{drop}\,/\,R_{taylor}$"),
        )):
            ax = axes[i, j]
            for k, key in enumerate(keys):
                sel = sorted((r for r in rows if (r.model, r.width) == key and r.noise == noise), key=lambda r: r.q)
                if not sel:
                    continue
                name = f"width {key[1]}" if key[1] is not None else key[0]
                line = ax.errorbar([r.q for r in sel], [getattr(r, ratio) for r in sel],
                                   yerr=[2 * getattr(r, err) for r in sel], marker="o", ms=4, capsize=2, label=name)
                if noise == "bernoulli" and ratio == "ratio_taylor" and sel[0].limit_ratio is not None:
                    ax.plot([min(r.q for r in rows) / 2], [sel[0].limit_ratio], marker="*", ms=11,
                            color=line[0].get_color(), linestyle="none")
            ax.axhline(1.0, color="k", lw=0.8)
            if ratio == "ratio_approx":
                ax.axhline(2.0, color="grey", lw=0.8, ls="--")
                ax.text(0.02, 2.0, "ratio if q/(1-q) were the right multiplier", va="bottom", fontsize=8,
                        color="grey", transform=ax.get_yaxis_transform())  # x in axes units: inside the panel
            ax.set_xscale("log")
            # padded limits (a star at min q / 2 included), so a single q is not drawn on the frame
            ax.set_xlim(min(r.q for r in rows) / 3, max(r.q for r in rows) * 1.5)
            ax.set_title(f"{noise} noise: {label}")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("drop probability q")
    axes[0, 0].legend(fontsize=8)
    if any(r.limit_ratio is not None for r in rows):
        axes[0, 1].plot([], [], marker="*", ls="none", color="k", label="q→0 limit ΣΔ / (½Σh²∂²ℓ)")
    axes[0, 1].legend(fontsize=8)
    probes = any(r.estimator != "exact" for r in rows)
    what = "the Monte Carlo gap and the probe estimates" if probes else "the Monte Carlo gap"
    fig.suptitle(title + f"\n(error bars: ±2 standard errors of {what})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    torch.set_num_threads(1)
    if any(not (0 < q < 1) for q in args.qs):
        raise DropcheckError(f"--qs must lie in (0, 1), got {args.qs}")
    if any(w < 1 for w in args.widths):
        raise DropcheckError(f"--widths must be positive, got {args.widths}")
    if args.samples < 2:
        raise DropcheckError("--samples must be >= 2")
    if args.estimator_samples < 10:
        raise DropcheckError(f"--estimator-samples must be >= 10 (10 batches of probes give the standard error), "
                             f"got {args.estimator_samples}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        jobs = [(m, None, c.model, c.inputs, c.targets) for m, c in ((m, user_case(m)) for m in args.model)]
        title = f"taylor-map of {', '.join(args.model)}"
    else:
        jobs = [("tanh-mlp", w, *tanh_family(w, seed=args.seed)) for w in args.widths]
        title = "taylor-map: tanh MLP 8-w-w-5, dropout after the first tanh layer, weights ~ 1/sqrt(fan-in), 16 examples"
    rows: list[MapRow] = []
    with tqdm(total=len(jobs) * len(args.qs) * 2, desc="taylor-map", unit="cell") as bar:
        for name, width, model, X, y in jobs:
            rows += map_model(name, model, X, y, args.qs, width=width, samples=args.samples,
                              seed=args.seed, progress=bar.update, limit=not args.no_limit,
                              estimator=args.estimator, estimator_samples=args.estimator_samples)
    print(format_rows(rows))
    dicts = [r.as_dict() for r in rows]
    _atomic_write(out / "taylor_map.json", json.dumps({"title": title, "rows": dicts}, indent=1))
    fd, tmp = tempfile.mkstemp(dir=out, prefix="taylor_map.csv.")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        w.writerows(dicts)
    os.replace(tmp, out / "taylor_map.csv")
    plot(rows, out / "taylor_map.png", title)
    print(f"\nwrote {out/'taylor_map.csv'}, {out/'taylor_map.json'}, {out/'taylor_map.png'}")
    return 0
