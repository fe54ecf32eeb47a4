"""``dropcheck figures`` / ``python -m paper_figures``: every figure and table
that the logs under ``--runs`` have arms for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dropcheck import DropcheckError

from .figures import FIGURES, draw
from .logs import read_runs
from .tables import table1, table2_pattern


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="results/runs", help="folder of JSON-lines run logs (searched recursively)")
    p.add_argument("--out", default="paper_figures/out", help="folder for the figures and tables")
    p.add_argument("--only", nargs="+", choices=sorted(FIGURES) + ["table1", "table2"], help="draw only these")


def run(args) -> int:
    runs_dir = Path(args.runs)
    if not runs_dir.exists():
        raise DropcheckError(f"--runs: no such folder or file {runs_dir}")
    problems: list[str] = []
    runs = read_runs(runs_dir, problems)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not runs:
        raise DropcheckError(f"no readable run log (*.jsonl with a header line) under {runs_dir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or list(FIGURES) + ["table1", "table2"])
    written = []
    for name in FIGURES:
        if name in wanted:
            written += draw(name, runs, out)
    if "table1" in wanted:
        written += table1(runs, out)
    if "table2" in wanted:
        written += table2_pattern(runs, out)
    print(f"{len(runs)} runs read, {len(problems)} problems; wrote:")
    for w in written:
        print(f"  {w}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figures", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except DropcheckError as exc:
        print(f"paper_figures: error: {exc}", file=sys.stderr)
        return 2
