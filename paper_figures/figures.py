"""Figures 1-5 (and the Section 5.2 ablations) from run logs.

Each figure selects its arms from the runs' configs and has three panels:

- every seed's validation perplexity against epoch (log scale), so each
  seed is shown to its last evaluation;
- the best validation perplexity so far, mean over *all* seeds of an arm
  (a seed that stopped keeps its best), with the seeds' min-max band, over
  the second half of training and on a y range fitted to it: the last point
  of each curve is the arm's mean best validation perplexity, the number
  the verdicts judge (``claims.py``), and the zoom shows the gaps they turn on;
- validation perplexity against training wall time, only for the runs of one
  machine and thread count (the group with the most runs; machines that
  the log does not record are left out), since minutes on other machines
  or thread counts are not comparable.

Titles name the arms shown and the claim they bear on, never a verdict (that
is in ``CLAIMS.md``).  An arm keeps one colour in every figure drawn from the
same runs (``arm_colours``).  Arms that are missing are simply absent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from .claims import _is, _pick_one, collect
from .logs import Run
from .rule_labels import check_rules


def _k(r: Run) -> int:
    return int(r.config.get("k", 1) or 1)


def _rule(r: Run) -> str:
    return r.config.get("rule", "?")


def _of(*rules: str):
    """Predicate: the run's rule is one of ``rules``, each a registered rule
    (``rule_labels.check_rules``): a renamed or unknown rule raises here
    instead of selecting nothing."""
    check_rules(*rules)
    names = frozenset(rules)
    return lambda r: _rule(r) in names


def _dropout(ks: Iterable[int]):
    ks, is_dropout = set(ks), _of("dropout")
    return lambda r: is_dropout(r) and _k(r) in ks


def _any(*preds):
    return lambda r: any(p(r) for p in preds)


def _select_fig2(runs):
    inject = _of("dropout_inject")
    ks = {_k(r) for r in runs if inject(r)}
    return _any(inject, _dropout(ks | {1}))


def _select_fig3(runs):
    ks = [_k(r) for r in runs if _of("dropout")(r)]
    return _any(_of("explicit", "none"), _dropout({1, max(ks, default=1)}))


def _select_ablations(runs):
    """C6's arms, and R_approx alone at the coefficient its first half is
    judged against: the one ``claims._c6`` picks (``claims._pick_one``, on the
    first shared seed), so the figure shows the ℓ2 → R_approx gap the identity
    threshold is a share of."""
    best = _pick_one(collect(runs), _is("explicit"))
    return _any(_of("identity_hessian", "loss_jacobian", "l2", "none"), _dropout({1}),
                lambda r: best is not None and r.arm_key == best.key)


def _select_fig4(runs):
    implicit = _of("dropout_implicit")
    ks = {_k(r) for r in runs if implicit(r)}
    return _any(implicit, _dropout(ks | {1}))


# name -> (title: the arms shown and the claim, claim id, selector)
FIGURES: dict[str, tuple[str, str, Callable]] = {
    "figure1_dropout_k": ("Figure 1: DROPOUT_k for each k, and no dropout (C1)", "C1",
                          lambda runs: _of("dropout", "none")),
    "figure2_noise_injection": ("Figure 2: DROPOUT_k + ξ̃_drop beside DROPOUT_1 and DROPOUT_k (C2)", "C2",
                                _select_fig2),
    "figure3_explicit": ("Figure 3: R_approx alone beside DROPOUT_1, the largest-k DROPOUT_k and no dropout (C3)",
                         "C3", _select_fig3),
    "figure4_dropout_k_implicit": ("Figure 4: DROPOUT_k + sqrt(1-1/k) ξ_approx beside DROPOUT_1 and DROPOUT_k (C4)",
                                   "C4", _select_fig4),
    "figure5_explicit_implicit": (
        "Figure 5: R_approx + ξ_approx beside R_approx alone and DROPOUT_1 (C5)", "C5",
        lambda runs: _any(_of("explicit_implicit", "explicit"), _dropout({1})),
    ),
    "ablations": (
        ("Section 5.2: identity H_out, loss-Jacobian R̃_approx and ℓ2 beside R_approx alone (the coefficient C6 "
         "judges against), DROPOUT_1 and no dropout (C6)"), "C6", _select_ablations,
    ),
}


def run_label(r: Run) -> str:
    """The arm's paper name, with the training-set size when it is not the full corpus."""
    n = int(r.config.get("train_tokens", 0) or 0)
    return r.label + (f" [{n} train tokens]" if n else "")


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


def arm_colours(runs: list[Run]) -> dict[str, tuple]:
    """One colour per arm label over all ``runs`` (sorted labels, tab20 then tab20b),
    so that an arm has the same colour in every figure of a study."""
    from matplotlib import colormaps

    tab20 = list(colormaps["tab20"].colors)
    # the saturated tab20 colours first, then the light ones, greys left out (too alike), then tab20b
    order = [c for i, c in enumerate(tab20[0:20:2]) if i != 7] + [c for i, c in enumerate(tab20[1:20:2]) if i != 7]
    order += list(colormaps["tab20b"].colors)
    labels = sorted({run_label(r) for r in runs})
    return {lab: order[i % len(order)] for i, lab in enumerate(labels)}


def machine(r: Run) -> str:
    """The machine and thread count a run's wall times belong to; '' when the log
    does not record the processor of a CPU run."""
    threads = r.config.get("threads")
    if r.device.startswith("cpu"):
        cpu = r.header.get("cpu")
        return f"{cpu}, {threads} thread(s)" if cpu else ""
    return f"{r.device}"


def _valid(run: Run, x: str):
    pts = [(e.get("epoch" if x == "epoch" else "wall_time"), e["valid_ppl"]) for e in run.evals]
    return [(a, b) for a, b in pts if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(b)]


def best_so_far(members: list[Run]) -> tuple[list[float], list[list[float]]]:
    """Epochs 1..the longest seed's last, and per epoch every seed's best
    validation perplexity so far (a seed that stopped keeps its best)."""
    curves = [_valid(m, "epoch") for m in members]
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    epochs = sorted({e for c in curves for e, _ in c})
    rows = []
    for e in epochs:
        row = []
        for c in curves:
            seen = [v for ep, v in c if ep <= e]
            row.append(min(seen) if seen else math.nan)
        rows.append(row)
    return epochs, rows


def draw(name: str, runs: list[Run], out: Path, colours: dict | None = None) -> list[Path]:
    """Draw one figure per corpus; returns the files written (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, _, selector = FIGURES[name]
    colours = colours or arm_colours(runs)
    pred = selector(runs)
    chosen = [r for r in runs if pred(r)]
    written = []
    for corpus in sorted({r.config.get("corpus", "?") for r in chosen}):
        here = [r for r in chosen if r.config.get("corpus", "?") == corpus]
        groups = group_arms(here)
        if not groups:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        lo, hi, start = math.inf, 0.0, 0.0
        last = max((e for m in here for e, _ in _valid(m, "epoch")), default=0.0)
        start = math.floor(last / 2)
        by_machine = defaultdict(list)
        for r in here:
            if machine(r):
                by_machine[machine(r)].append(r)
        wall = max(by_machine.items(), key=lambda kv: (len({run_label(r) for r in kv[1]}), len(kv[1]), kv[0]),
                   default=("", []))
        if len({run_label(r) for r in wall[1]}) < 2:  # one arm alone: nothing to compare
            wall = (wall[0], [])
        for (_, label), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
            col = colours.get(label, "0.3")
            for i, m in enumerate(sorted(members, key=lambda r: r.path.name)):
                c = _valid(m, "epoch")
                if c:
                    axes[0].plot(*zip(*c), color=col, lw=1, alpha=0.75, marker="o", ms=2,
                                 label=f"{label} ({len(members)} seed{'s' if len(members) > 1 else ''})" if i == 0 else None)
            epochs, rows = best_so_far(members)
            keep = [i for i, e in enumerate(epochs) if e >= start]
            if keep:
                xs = [epochs[i] for i in keep]
                mean = [sum(rows[i]) / len(rows[i]) for i in keep]
                axes[1].plot(xs, mean, color=col, marker="o", ms=3, lw=1.6, label=f"{label} ({len(rows[0])})")
                if len(rows[0]) > 1:
                    axes[1].fill_between(xs, [min(rows[i]) for i in keep], [max(rows[i]) for i in keep], color=col,
                                         alpha=0.15)
                lo = min(lo, min(mean))
                hi = max(hi, max(mean))
            for m in wall[1]:
                if m in members:
                    c = _valid(m, "wall")
                    if c:
                        axes[2].plot([t / 60 for t, _ in c], [v for _, v in c], color=col, lw=1, alpha=0.8)
        if math.isfinite(lo):
            pad = max(0.5, 0.06 * (hi - lo))
            axes[1].set_ylim(lo - pad, hi + pad)
            axes[1].set_xlim(start - 0.3, last + 0.3)
        axes[0].set_yscale("log")
        if wall[1]:
            axes[2].set_yscale("log")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("validation perplexity (log scale)")
        axes[0].set_title("every seed", fontsize=9)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("best validation perplexity so far")
        axes[1].set_title(f"from epoch {start:g}: mean over all seeds (a stopped seed keeps its best),\n"
                          f"band min-max; the last point is the mean best the verdicts judge", fontsize=8)
        axes[2].set_xlabel("training wall time (min)")
        axes[2].set_ylabel("validation perplexity (log scale)")
        if wall[1]:
            axes[2].set_title(f"only the runs of one machine and thread count:\n{wall[0]} ({len(wall[1])} of "
                              f"{len(here)} runs)", fontsize=8)
        else:
            axes[2].set_axis_off()
            axes[2].text(0.5, 0.5, "wall time: fewer than two arms ran on one\nrecorded machine and thread count, "
                         "so minutes\nare not compared here", ha="center", va="center", fontsize=9,
                         transform=axes[2].transAxes)
        for ax in axes:
            ax.grid(alpha=0.3, which="both")
        if axes[0].get_legend_handles_labels()[0]:  # a figure of runs with no finite curve has nothing to list
            axes[0].legend(fontsize=7)
        devices = sorted({r.device for r in chosen})
        configs = sorted({r.config_name for r in chosen})
        fig.suptitle(f"{title} — {corpus}\nconfig: {', '.join(configs)}; device: {', '.join(devices)}; "
                     f"verdict: CLAIMS.md", fontsize=10)
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
