"""One figure of a whole study: every arm's best validation perplexity, one
dot per seed, with the seed noise the claims judge by.

The learning-curve figures (``figures.py``) show how each arm trains, but
the final differences the claims rest on are a few points out of 200.  Here
each arm is one row: its seeds' best validation perplexities as dots, their
mean as a bar, and around DROPOUT_1's mean a band of ± the noise rule's margin
for two arms of DROPOUT_1's seed count (``claims.noise_rule``,
``docs/verdicts.md``), so an arm of as many seeds inside the band is not
clearly apart from dropout.
"""

from __future__ import annotations

from pathlib import Path

from .arms import arm_label
from .claims import ArmStats, _is, _pick_one, collect, noise_rule
from .figures import save_figure
from .logs import Run


def summary_rows(arms: dict[str, ArmStats], plan_name: str = "") -> list[tuple[str, list, float]]:
    """``(label, seeds' best validation perplexities, mean)`` per arm, worst first
    (the plot's bottom row first); the label is the paper's name, the arm and its seed count."""
    rows = sorted(arms.values(), key=lambda a: a.mean, reverse=True)
    return [(f"{a.label or arm_label(a.cfg)}  [{a.key.removeprefix(plan_name + '-')}, {a.seeds}]", list(a.values), a.mean)
            for a in rows]


def draw_summary(runs: list[Run], out: Path, plan_name: str = "") -> list[Path]:
    """``best_valid.png`` and ``.pdf`` under ``out``; nothing when no run is complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = collect(runs)
    if not arms:
        return []
    rows = summary_rows(arms, plan_name)
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.36 * len(rows)))
    d1 = _pick_one(arms, _is("dropout", k=1))
    rule = noise_rule(arms)
    if d1 is not None and rule.df > 0:
        half = rule.margin(d1.seeds, d1.seeds)
        ax.axvspan(d1.mean - half, d1.mean + half, color="tab:blue", alpha=0.12,
                   label=f"DROPOUT_1 mean ± margin, {d1.seeds} vs {d1.seeds} seeds ({half:.2f}; "
                         f"s_pooled {rule.s_pooled:.2f}, df {rule.df})")
    for y, (_, values, mean) in enumerate(rows):
        ax.plot(values, [y] * len(values), "o", ms=4, color="0.35", alpha=0.8)
        ax.plot([mean], [y], "|", ms=14, mew=2.2, color="tab:red")
    ax.plot([], [], "o", ms=4, color="0.35", label="one seed")
    ax.plot([], [], "|", ms=10, mew=2, color="tab:red", label="mean over seeds")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _, _ in rows], fontsize=8)
    ax.set_xlabel("best validation perplexity (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")  # the best arms sit top left
    devices = sorted({r.device for r in runs if r.final})
    ax.set_title(f"Every arm of {plan_name or 'the study'}: best validation perplexity per seed\n"
                 f"[arm, seeds]; device: {', '.join(devices)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / "best_valid")
