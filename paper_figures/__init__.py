"""Figures and tables of Wei, Kakade & Ma (ICML 2020) drawn from our run logs.

Everything here reads the JSON-lines logs that ``training/`` writes (one
header line with the config, evaluation lines, a final line) and nothing
else: no number of ours is typed in by hand.  ``python -m paper_figures
--runs results/runs --out paper_figures/out`` (or ``dropcheck figures``)
draws every figure and table it has the arms for.
"""

from .logs import Run, read_runs
from .arms import arm_label

__all__ = ["Run", "read_runs", "arm_label"]
