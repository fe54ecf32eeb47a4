"""Table 2 and claim C7 from the logs of a two-size study (plan ``cpu-ptb-gpt2``).

The paper (Table 2, Transformer-XL on WikiText-103): on the full data
DROPOUT_2 and DROPOUT_4 match DROPOUT_1 (23.13, 23.14 against 23.39); on a
fifth of the data DROPOUT_4 falls behind (47.40 against 46.05).  Claim C7:
the implicit effect of dropout (what DROPOUT_k removes) matters less as the
data grows.  R_approx comes within 0.7 of dropout on the full data (24.12).

Everything is read from the logs' headers and records: the size of a run
is its config's ``train_tokens`` (the largest size is ``1x``, the others
their ratio to it), its method the rule's label.  Every comparison uses the
noise rule of ``docs/verdicts.md`` (``noise.py``): the pooled within-arm seed
standard deviation over every arm of the study with at least 2 seeds (both
sizes), a two-sided 95% t margin, on the seeds both arms have.

Claims, pre-registered (``docs/verdicts.md``, "Table 2 and C7"):

- ``regime-<size>``: no regularization overfits: its mean best validation
  perplexity is at least 10% above DROPOUT_1's (issue 27).  Where it is not,
  the regularizers cannot be told apart there and the claims that use that
  size are "untestable here".
- ``T2-1x``: DROPOUT_2 and DROPOUT_4 are not clearly worse than DROPOUT_1.
- ``T2-<small>``: DROPOUT_4 is clearly worse than DROPOUT_1.
- ``C7``: the gap DROPOUT_4 − DROPOUT_1 is clearly larger at the small size
  than at 1x (``noise.compare_gaps``).
- ``R_approx``: at 1x, R_approx is not clearly worse than DROPOUT_1 and is
  clearly better than no regularization.  R_approx + ξ_approx is reported
  beside it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .claims import _seed
from .logs import Run
from .noise import NoiseRule, compare_arms, compare_gaps

__all__ = ["PAPER", "study_arms", "judge", "write_table2"]

# Table 2 of the paper (best validation perplexity); "1x" is its full WikiText-103
PAPER = {
    ("1x", "no dropout"): 29.45,
    ("1x", "DROPOUT_1"): 23.39,
    ("1x", "DROPOUT_2"): 23.13,
    ("1x", "DROPOUT_4"): 23.14,
    ("1x", "R_approx"): 24.12,
    ("0.2x", "DROPOUT_1"): 46.05,
    ("0.2x", "DROPOUT_2"): 46.07,
    ("0.2x", "DROPOUT_4"): 47.40,
}
METHODS = ("no dropout", "DROPOUT_1", "DROPOUT_2", "DROPOUT_4", "R_approx", "R_approx + ξ_approx")
OVERFIT = 0.10  # no regularization at least 10% above DROPOUT_1: the regime can show a regularizer


def _size_labels(runs: list[Run]) -> dict[int, str]:
    sizes = sorted({int(r.config.get("train_tokens", 0) or 0) for r in runs}, reverse=True)
    if not sizes:
        return {}
    top = sizes[0]
    return {s: "1x" if s == top else f"{s / top:g}x" for s in sizes}


def study_arms(runs: list[Run]) -> dict[tuple[str, str], dict[int, Run]]:
    """``{(size, method): {seed: run}}`` from the logs alone."""
    labels = _size_labels(runs)
    out: dict[tuple[str, str], dict[int, Run]] = defaultdict(dict)
    for r in runs:
        seed = _seed(r)
        if seed is None or r.final is None:
            continue
        out[(labels[int(r.config.get("train_tokens", 0) or 0)], r.label)][seed] = r
    return dict(out)


def _best(arms, size: str, method: str) -> dict[int, float]:
    return {s: r.best_valid() for s, r in arms.get((size, method), {}).items() if math.isfinite(r.best_valid())}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _regime(arms, size: str) -> dict:
    none, d1 = _best(arms, size, "no dropout"), _best(arms, size, "DROPOUT_1")
    seeds = sorted(set(none) & set(d1))
    if not seeds:
        return {"claim": f"regime-{size}", "verdict": "not yet run", "text": "needs no dropout and DROPOUT_1"}
    ratio = _mean(none[s] for s in seeds) / _mean(d1[s] for s in seeds) - 1.0
    ok = ratio >= OVERFIT
    return {"claim": f"regime-{size}", "verdict": "holds" if ok else "fails", "seeds": seeds,
            "excess": round(ratio, 4),
            "text": f"no dropout {100 * ratio:+.1f}% against DROPOUT_1 (needs at least +{100 * OVERFIT:.0f}%)"}


def _cmp(arms, rule, size, a, b):
    return compare_arms(_best(arms, size, a), _best(arms, size, b), rule, names=(f"{a} ({size})", f"{b} ({size})"))


def _verdict(parts: list[str]) -> str:
    """Parts are "holds", "fails", "untestable here" or "not yet run"."""
    if "not yet run" in parts:
        return "not yet run"
    if "untestable here" in parts:
        return "untestable here"
    if all(p == "holds" for p in parts):
        return "reproduced"
    return "partly" if "holds" in parts else "not reproduced"


def judge(runs: list[Run]) -> dict:
    """The claims (module docstring) as a JSON-ready dict."""
    arms = study_arms(runs)
    rule = NoiseRule.pooled([list(_best(arms, s, m).values()) for s, m in arms])
    sizes = sorted({s for s, _ in arms}, key=lambda s: -float(s[:-1]))
    small = [s for s in sizes if s != "1x"]
    regimes = {s: _regime(arms, s) for s in sizes}

    def part(c, want: str) -> str:
        if c.outcome == "not yet run":
            return "not yet run"
        return "holds" if (c.outcome in want.split("|")) else "fails"

    def gate(size: str) -> Optional[str]:
        v = regimes.get(size, {}).get("verdict")
        return None if v == "holds" else ("not yet run" if v in (None, "not yet run") else "untestable here")

    claims = []
    # T2 at 1x: DROPOUT_2, DROPOUT_4 not clearly worse than DROPOUT_1
    cs = [_cmp(arms, rule, "1x", f"DROPOUT_{k}", "DROPOUT_1") for k in (2, 4)]
    ps = [gate("1x") or part(c, "same|better") for c in cs]
    claims.append({"claim": "T2-1x", "statement": "at 1x, DROPOUT_2 and DROPOUT_4 match DROPOUT_1 (not clearly worse)",
                   "verdict": _verdict(ps), "comparisons": [c.as_json() for c in cs],
                   "text": [c.text() for c in cs]})
    for s in small:
        cs = [_cmp(arms, rule, s, "DROPOUT_4", "DROPOUT_1"), _cmp(arms, rule, s, "DROPOUT_2", "DROPOUT_1")]
        ps = [gate(s) or part(cs[0], "worse")]
        claims.append({"claim": f"T2-{s}", "statement": f"at {s}, DROPOUT_4 is clearly worse than DROPOUT_1 "
                       "(DROPOUT_2 reported)", "verdict": _verdict(ps),
                       "comparisons": [c.as_json() for c in cs], "text": [c.text() for c in cs]})
        g = compare_gaps(_best(arms, s, "DROPOUT_4"), _best(arms, s, "DROPOUT_1"),
                         _best(arms, "1x", "DROPOUT_4"), _best(arms, "1x", "DROPOUT_1"), rule)
        gp = gate(s) or gate("1x") or ("not yet run" if g.outcome == "not yet run" else
                                      "holds" if g.outcome == "larger" else "fails")
        txt = ("not yet run" if g.outcome == "not yet run" else
               f"DROPOUT_4 - DROPOUT_1: {g.gap_ab:+.2f} at {s} against {g.gap_cd:+.2f} at 1x (difference "
               f"{g.gap_ab - g.gap_cd:+.2f}, margin {g.margin:.2f}, seeds {', '.join(map(str, g.seeds))}): "
               f"{g.outcome} at {s}")
        claims.append({"claim": "C7" if len(small) == 1 else f"C7-{s}",
                       "statement": f"the DROPOUT_4 - DROPOUT_1 gap is clearly larger at {s} than at 1x",
                       "verdict": _verdict([gp]), "gap": g.as_json(), "text": [txt]})
    cs = [_cmp(arms, rule, "1x", "R_approx", "DROPOUT_1"), _cmp(arms, rule, "1x", "R_approx", "no dropout"),
          _cmp(arms, rule, "1x", "R_approx + ξ_approx", "DROPOUT_1")]
    ps = [gate("1x") or part(cs[0], "same|better"), gate("1x") or part(cs[1], "better")]
    claims.append({"claim": "R_approx", "statement": "at 1x, R_approx is not clearly worse than DROPOUT_1 and clearly "
                   "better than no dropout (R_approx + ξ_approx reported)", "verdict": _verdict(ps),
                   "comparisons": [c.as_json() for c in cs], "text": [c.text() for c in cs]})
    return {"noise_rule": rule.as_json(), "sizes": sizes, "regimes": list(regimes.values()), "claims": claims}


def _table(arms, sizes) -> list[list[str]]:
    rows = []
    for s in sizes:
        for m in METHODS:
            vals = _best(arms, s, m)
            mean = _mean(vals.values())
            tests = [r.test_ppl() for r in arms.get((s, m), {}).values()]
            paper = PAPER.get((s, m))
            rows.append([s, m, str(len(vals)), "-" if not vals else f"{mean:.2f}",
                         "-" if len(vals) < 2 else f"{max(vals.values()) - min(vals.values()):.2f}",
                         "-" if not tests else f"{_mean(tests):.2f}", "-" if paper is None else f"{paper:.2f}"])
    return rows


def _figure(arms, sizes, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure

    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.2 * len(sizes), 7.5), squeeze=False)
    for j, s in enumerate(sizes):
        ax = axes[0][j]
        for i, m in enumerate(METHODS):
            vals = _best(arms, s, m)
            if not vals:
                continue
            ax.scatter([i] * len(vals), list(vals.values()), color=colours[m], s=18)
            ax.hlines(_mean(vals.values()), i - 0.3, i + 0.3, color=colours[m])
        ax.set_xticks(range(len(METHODS)), [m.replace(" + ", "\n+ ") for m in METHODS], fontsize=7)
        ax.set_ylabel("best validation perplexity (seeds, mean)")
        ax.set_title(f"{s} training slice: best validation perplexity")
        ax = axes[1][j]
        for m in METHODS:
            for r in arms.get((s, m), {}).values():
                pts = [(e["epoch"], e["valid_ppl"]) for e in r.evals if math.isfinite(e.get("valid_ppl", math.nan))]
                if pts:
                    ax.plot(*zip(*pts), color=colours[m], lw=1, label=m)
        handles = {ln.get_label(): ln for ln in ax.get_lines()}
        if handles:
            ax.legend(list(handles.values()), list(handles), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation perplexity (every seed)")
        ax.set_title(f"{s}: validation curves")
    fig.suptitle("Table 2 at CPU scale: DROPOUT_k, R_approx and no dropout at two training-set sizes")
    fig.tight_layout()
    return save_figure(fig, out / "table2")


def write_table2(runs: list[Run], out: Path, plan_name: str = "") -> list[Path]:
    """``claims.json``, ``CLAIMS.md``, ``table2.md``/``.csv`` and ``table2.png``/``.pdf`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    arms = study_arms(runs)
    result = judge(runs)
    sizes = result["sizes"]
    written = []
    rows = _table(arms, sizes)
    head = ["size", "method", "seeds", "best valid (mean)", "range", "test (mean)", "paper (WikiText-103)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    (out / "table2.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "table2.csv").write_text("\n".join(",".join(r) for r in [head] + rows) + "\n", encoding="utf-8")
    written += [out / "table2.md", out / "table2.csv"]
    written += _figure(arms, sizes, out) if arms else []
    (out / "claims.json").write_text(json.dumps({"plan": plan_name, **result}, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    nr = result["noise_rule"]
    lines = [f"# Table 2 and C7 at CPU scale{f' ({plan_name})' if plan_name else ''}", "",
             "Generated from the run logs by `dropcheck reproduce --draw-only` (paper_figures/table2.py); the rule "
             "is in docs/verdicts.md.", "",
             f"Noise rule: s_pooled = {nr['s_pooled']}, df = {nr['df']}, t(0.975, df) = {nr['t_0.975']}.", "",
             "## Regime", ""]
    lines += [f"- **{r['claim']}**: {r['verdict']}. {r['text']}" for r in result["regimes"]]
    lines += ["", "## Claims", ""]
    for c in result["claims"]:
        lines.append(f"- **{c['claim']}** ({c['statement']}): **{c['verdict']}**")
        lines += [f"  - {t}" for t in c["text"]]
    lines += ["", "## Table 2 twin", "", *md, "", "![Table 2 at CPU scale](table2.png)", ""]
    (out / "CLAIMS.md").write_text("\n".join(lines), encoding="utf-8")
    written += [out / "claims.json", out / "CLAIMS.md"]
    return written
