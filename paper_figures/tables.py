"""Table 1 (best validation perplexity per method, beside the paper's) and
Table 2's pattern (DROPOUT_k across training-set sizes), from run logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .figures import group_arms
from .logs import Run

# The paper's Table 1 (PTB, AWD-LSTM, q = 0.4), quoted from PAPER_RESULTS.md:
# these are the paper's numbers, shown beside ours, never used for ours.
PAPER_PTB = {
    "no dropout": 120.0,  # "about 120" (Section 3 text)
    "identity H_out": 108.76,
    "ℓ2": 112.04,
    "R̃_approx": 84.06,
    "R_approx": 84.52,
    "DROPOUT_1": 73.76,
    "R̃_approx + ξ_approx": 79.54,
    "R_approx + ξ_approx": 72.99,
}


def _mean(xs):
    xs = [x for x in xs if isinstance(x, float) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def table1(runs: list[Run], out: Path) -> list[Path]:
    rows = []
    for (corpus, label), members in sorted(group_arms(runs).items()):
        rows.append({
            "corpus": corpus,
            "method": label,
            "seeds": len(members),
            "best_valid_ppl": _mean([m.best_valid() for m in members]),
            "test_ppl": _mean([m.test_ppl() for m in members]),
            "steps": max(int(m.final["step"]) if m.final else (m.evals[-1]["step"] if m.evals else 0) for m in members),
            "epochs": max((m.evals[-1].get("epoch", math.nan) if m.evals else math.nan) for m in members),
            "paper_valid_ppl": PAPER_PTB.get(label.split(" (")[0].split(" [")[0], math.nan) if corpus == "ptb" else math.nan,
            "config": ", ".join(sorted({m.config_name for m in members})),
            "device": ", ".join(sorted({m.device for m in members})),
        })
    paths = [out / "table1.csv", out / "table1.md"]
    if not rows:
        return []
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "-" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| corpus | method | seeds | best valid ppl (ours) | test ppl (ours) | paper valid ppl | epochs | config | device |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["corpus"], -r["best_valid_ppl"] if math.isfinite(r["best_valid_ppl"]) else 0)):
        lines.append(f"| {r['corpus']} | {r['method']} | {r['seeds']} | {fmt(r['best_valid_ppl'])} | {fmt(r['test_ppl'])} | "
                     f"{fmt(r['paper_valid_ppl'])} | {fmt(r['epochs'])} | {r['config']} | {r['device']} |")
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def table2_pattern(runs: list[Run], out: Path) -> list[Path]:
    """Best validation perplexity of DROPOUT_k by training-set size (C7)."""
    sel = [r for r in runs if r.config.get("rule") == "dropout"]
    sizes = sorted({int(r.config.get("train_tokens", 0) or 0) for r in sel})
    if len(sizes) < 2:
        return []
    ks = sorted({int(r.config.get("k", 1)) for r in sel})
    name = lambda s: "full" if s == 0 else f"{s} tokens"  # noqa: E731
    lines = ["| DROPOUT_k | " + " | ".join(name(s) for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for k in ks:
        cells = []
        for s in sizes:
            v = _mean([r.best_valid() for r in sel if int(r.config.get("k", 1)) == k
                       and int(r.config.get("train_tokens", 0) or 0) == s])
            cells.append("-" if not math.isfinite(v) else f"{v:.2f}")
        lines.append(f"| DROPOUT_{k} | " + " | ".join(cells) + " |")
    path = out / "table2_pattern.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
