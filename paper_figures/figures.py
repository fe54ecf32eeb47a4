"""Figures 1-5 (and the Section 5.2 ablations) from run logs.

Each figure selects its arms from the runs' configs, groups seeds of one arm
(mean line, min-max band), and plots validation perplexity against epoch and
against training wall time, with the devices and configs in the caption.
Arms that are missing are named in the caption rather than silently dropped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from .arms import arm_label
from .logs import Run


def _k(r: Run) -> int:
    return int(r.config.get("k", 1) or 1)


def _rule(r: Run) -> str:
    return r.config.get("rule", "?")


def _dropout(ks: Iterable[int]):
    ks = set(ks)
    return lambda r: _rule(r) == "dropout" and _k(r) in ks


def _any(*preds):
    return lambda r: any(p(r) for p in preds)


def _select_fig2(runs):
    ks = {_k(r) for r in runs if _rule(r) == "dropout_inject"}
    return _any(lambda r: _rule(r) == "dropout_inject", _dropout(ks | {1}))


def _select_fig3(runs):
    ks = [_k(r) for r in runs if _rule(r) == "dropout"]
    return _any(lambda r: _rule(r) in ("explicit", "none"), _dropout({1, max(ks, default=1)}))


def _select_fig4(runs):
    ks = {_k(r) for r in runs if _rule(r) == "dropout_implicit"}
    return _any(lambda r: _rule(r) == "dropout_implicit", _dropout(ks | {1}))


FIGURES: dict[str, tuple[str, Callable]] = {
    "figure1_dropout_k": (
        "Figure 1: DROPOUT_k gets worse as k grows (C1)",
        lambda runs: _any(lambda r: _rule(r) in ("dropout", "none")),
    ),
    "figure2_noise_injection": ("Figure 2: DROPOUT_k + ξ̃_drop recovers DROPOUT_1 (C2)", _select_fig2),
    "figure3_explicit": ("Figure 3: R_approx alone vs DROPOUT_1 and DROPOUT_k (C3)", _select_fig3),
    "figure4_dropout_k_implicit": ("Figure 4: DROPOUT_k + sqrt(1-1/k) ξ_approx tracks DROPOUT_1 (C4)", _select_fig4),
    "figure5_explicit_implicit": (
        "Figure 5: R_approx + ξ_approx vs DROPOUT_1 (C5)",
        lambda runs: _any(lambda r: _rule(r) in ("explicit_implicit", "explicit"), _dropout({1})),
    ),
    "ablations": (
        "Section 5.2: identity H_out, loss-Jacobian R̃_approx, ℓ2 (C6)",
        lambda runs: _any(lambda r: _rule(r) in ("identity_hessian", "loss_jacobian", "l2", "none"), _dropout({1})),
    ),
}


def run_label(r: Run) -> str:
    """The arm's paper name, with the training-set size when it is not the full corpus."""
    n = int(r.config.get("train_tokens", 0) or 0)
    return arm_label(r.config) + (f" [{n} train tokens]" if n else "")


def group_arms(runs: list[Run]) -> dict:
    """``{(corpus, label): [runs]}``: the seeds of one arm together, an arm
    being one config but for its seed (``logs.config_key``).  Arms that share
    a label but differ in other keys (a clip, a device) stay apart, their
    labels followed by the keys that tell them apart."""
    import json

    from .logs import config_key

    groups = defaultdict(list)
    for r in runs:
        groups[(r.config.get("corpus", "?"), run_label(r), config_key(r))].append(r)
    keys = defaultdict(list)
    for corpus, label, key in groups:
        keys[(corpus, label)].append(json.loads(key))
    out = {}
    for (corpus, label, key), members in groups.items():
        cfgs = keys[(corpus, label)]
        if len(cfgs) > 1:
            mine = json.loads(key)
            differ = sorted({k for c in cfgs for k in c if any(d.get(k) != c.get(k) for d in cfgs)})
            label = f"{label} [{', '.join(f'{k}={mine.get(k)}' for k in differ)}]"
        out[(corpus, label)] = members
    return out


def _curve(run: Run, x: str):
    pts = [(e.get("epoch" if x == "epoch" else "wall_time"), e["valid_ppl"]) for e in run.evals]
    return [(a, b) for a, b in pts if isinstance(a, (int, float)) and math.isfinite(b)]


def draw(name: str, runs: list[Run], out: Path) -> list[Path]:
    """Draw one figure per corpus; returns the files written (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, selector = FIGURES[name]
    pred = selector(runs)
    chosen = [r for r in runs if pred(r)]
    written = []
    for corpus in sorted({r.config.get("corpus", "?") for r in chosen}):
        groups = group_arms([r for r in chosen if r.config.get("corpus", "?") == corpus])
        if not groups:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        for (_, label), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
            for ax, x in zip(axes, ("epoch", "wall")):
                curves = [_curve(m, x) for m in members]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                xs = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
                ys = [[c[i][1] for c in curves] for i in range(n)]
                mean = [sum(v) / len(v) for v in ys]
                seeds = f" ({len(curves)} seeds)" if len(curves) > 1 else ""
                line = ax.plot(xs, mean, marker="o", ms=3, label=label + seeds)[0]
                if len(curves) > 1:
                    ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], alpha=0.2, color=line.get_color())
        for ax, xl in zip(axes, ("epoch", "training wall time (s)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("validation perplexity")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        devices = sorted({r.device for r in chosen})
        configs = sorted({r.config_name for r in chosen})
        fig.suptitle(f"{title} — {corpus}\nconfig: {', '.join(configs)}; device: {', '.join(devices)}", fontsize=10)
        fig.tight_layout()
        written += save_figure(fig, out / f"{name}_{corpus}")
    return written


def save_figure(fig, stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, then close ``fig``; no creation date in
    the PDF, so the same logs give the same bytes."""
    import matplotlib.pyplot as plt

    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=110, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths
