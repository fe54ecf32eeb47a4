"""The README's Python examples run as written (docs that match the code).

Every ```python block of README.md runs, in order, in one namespace (the
tour's imports serve the later blocks).  A line ending in a comment that
starts with ``# [`` or ``# (`` shows what the line before it prints: a list
or tuple literal, with ``...`` for "and more"; its shown items must be the
value's first items.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _shown(comment: str) -> list:
    """The items a ``# [a, b, ...]`` comment shows (``...`` dropped)."""
    return [x for x in ast.literal_eval(comment.replace("...", "None")) if x is not None]


def test_the_readme_has_python_examples():
    assert len(_blocks()) >= 3


def test_every_python_block_of_the_readme_runs():
    pytest.importorskip("transformers")
    ns: dict = {}
    for i, block in enumerate(_blocks()):
        where, done = f"README.md python block {i}", 0
        lines = block.splitlines()
        for j, line in enumerate(lines):
            if re.match(r"\s*# [\[(]", line):  # shows what the statement on the line before gives
                exec(compile("\n".join(lines[done:j - 1]), where, "exec"), ns)  # noqa: S102
                got = eval(lines[j - 1], ns)  # noqa: S307 (our own README)
                want = _shown(line.strip()[2:])
                assert list(got)[: len(want)] == want, (where, lines[j - 1], got)
                done = j + 1
        exec(compile("\n".join(lines[done:]), where, "exec"), ns)  # noqa: S102


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]


@pytest.mark.parametrize("first, folder", [("arm", "cpu-ptb"), ("run", "cpu-ptb-clip")])
def test_the_cpu_study_tables_are_the_committed_logs(first, folder):
    """The README's cpu-ptb results table (and the clipping probe's, first
    column ``run``) is typed by hand; every row must be complete logs under
    results/runs/<folder> (best valid, test, best epoch, training time, seed
    by seed), and every complete log must be in it."""
    from paper_figures.logs import read_run

    text = README.read_text(encoding="utf-8")
    start = text.index(f"| {first} | seeds | best valid ppl | test ppl | best epoch | training time |")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    shown = []
    for row in rows:
        arm, seeds, valid, test, epoch, minutes = [c.strip() for c in row.strip("|").split("|")]
        cols = [_numbers(c) for c in (valid, test, epoch, minutes)]
        assert all(len(c) == int(seeds) for c in cols), row
        shown += [(arm, *v) for v in zip(*cols)]
    logged = []
    for path in sorted((README.parent / "results" / "runs" / folder).glob("*.jsonl")):
        run = read_run(path, [])
        if run is None or run.final is None:
            continue
        f = run.final
        epoch = next(e["epoch"] for e in run.evals if e["step"] == f["best_step"])
        logged.append((path.stem, round(f["best_valid_ppl"], 2), round(f["test_ppl"], 2), epoch,
                       round(f["wall_time"] / 60)))
    want = sorted(v[1:] for v in logged)
    got = sorted(v[1:] for v in shown)
    missing = [v for v in logged if v[1:] not in got]
    unknown = [v for v in shown if v[1:] not in want]
    assert not missing and not unknown, f"complete logs not in the README table: {missing}; " \
                                        f"README rows that are no complete log: {unknown}"
    assert got == want
