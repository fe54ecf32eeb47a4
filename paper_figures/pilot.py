"""The table of a pilot: one row per run log, read from the logs and nothing else.

A pilot is a folder of ordinary training logs (``results/runs/<study>-pilot/``)
made to choose a study's config before its plan runs.  Its notebook
(``results/<study>/README.md``) shows this table; ``tests/test_readme.py``
checks that the table there is the one these logs give, so a run added to the
folder fails the test until the notebook is regenerated::

    python -m paper_figures.pilot results/runs/cpu-ptb-gpt2-pilot

Rows are sorted by training-set size (largest first), then model, then
optimizer and learning rate, then run name.  "best valid" is the run's best validation
perplexity; "end" is the final record's stop reason, or "stopped by hand at
epoch N" for a log without a final record (a run ended with SIGTERM once its
trend was clear); "training min" is the log's training wall time.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .log_schema import LATER_KEYS
from .logs import Run, read_runs

COLUMNS = ("size", "train tokens", "optimizer, lr", "model", "run", "q", "best valid",
           "epoch of best", "clean train ppl there", "end", "training min")
# the drop probabilities of each arch, as the q column names them (a key missing from an older log is 0)
_Q = {
    "gpt2": (("q_embedding", "emb"), ("q_attention", "attn"), ("q_residual", "resid"), ("q_head", "head")),
    "awd-lstm": (("q_embedding", "emb"), ("q_hidden", "hidden"), ("q_output", "out"), ("q_weights", "weights"),
                 ("q_rows", "rows")),
}


def _size(tokens: int, full: int) -> str:
    r = tokens / full
    return f"{r:g}x"


def _arch(cfg: dict) -> str:
    return cfg.get("arch", LATER_KEYS["arch"])  # a log older than the key ran what LATER_KEYS says


def _model(cfg: dict) -> str:
    if _arch(cfg) == "awd-lstm":
        return f"AWD-LSTM emb {cfg.get('emb')}, hidden {cfg.get('hidden')}, {cfg.get('layers')} layers"
    return f"GPT-2 emb {cfg.get('emb')}, {cfg.get('layers')} layers, {cfg.get('heads')} heads"


def _q(cfg: dict) -> str:
    """The nonzero drop probabilities, e.g. ``emb 0.3, attn 0.1``; ``-`` for a run without dropout."""
    if cfg.get("rule") == "none":
        return "-"
    qs = [f"{label} {cfg.get(key, 0.0):g}" for key, label in _Q.get(_arch(cfg), ()) if cfg.get(key, 0.0)]
    return ", ".join(qs) or "-"


def _best_eval(run: Run):
    evals = [e for e in run.evals if isinstance(e.get("valid_ppl"), (int, float)) and math.isfinite(e["valid_ppl"])]
    return min(evals, key=lambda e: e["valid_ppl"]) if evals else None


def _end(run: Run) -> str:
    if run.final is not None:
        return str(run.final.get("stop", "?"))
    last = run.evals[-1]["epoch"] if run.evals else 0
    return f"stopped by hand at epoch {last:g}"


def _minutes(run: Run) -> float:
    rec = run.final if run.final is not None else (run.evals[-1] if run.evals else {})
    return float(rec.get("wall_time", 0.0)) / 60.0


def rows(runs: list[Run]) -> list[dict]:
    """One dict per run, keyed by ``COLUMNS``; the size is relative to the largest slice among them."""
    full = max(int(r.config.get("train_tokens", 0)) for r in runs)
    out = []
    for r in runs:
        cfg, best = r.config, _best_eval(r)
        out.append({
            "_sort": (-int(cfg.get("train_tokens", 0)), _arch(cfg), cfg.get("emb", 0), cfg.get("layers", 0),
                      cfg.get("optimizer", ""), -float(cfg.get("lr", 0)), r.name),
            "size": _size(int(cfg.get("train_tokens", 0)), full),
            "train tokens": f"{int(cfg.get('train_tokens', 0)):,}",
            "optimizer, lr": f"{cfg.get('optimizer', 'sgd')} {float(cfg.get('lr', 0)):g}",
            "model": _model(cfg),
            "run": f"`{r.name}`",
            "q": _q(cfg),
            "best valid": f"{r.best_valid():.2f}",
            "epoch of best": f"{best['epoch']:g}" if best else "-",
            "clean train ppl there": f"{best['clean_train_ppl']:.1f}" if best and "clean_train_ppl" in best else "-",
            "end": _end(r),
            "training min": f"{_minutes(r):.0f}",
        })
    return sorted(out, key=lambda d: d["_sort"])


def pilot_table(folder) -> str:
    """The markdown table of every run log under ``folder`` (see the module docstring)."""
    runs = read_runs(folder)
    if not runs:
        raise ValueError(f"no run logs under {folder}")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(runs):
        lines.append("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    total = sum(_minutes(r) for r in runs)
    lines.append("")
    lines.append(f"{len(runs)} runs, {total:.0f} training minutes in all.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.pilot", description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a pilot's folder of run logs")
    args = ap.parse_args(argv)
    print(pilot_table(args.folder), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
