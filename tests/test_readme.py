"""The README and the docs match the code and the logs.

Every ```python block of README.md runs, in order, in one namespace (the
tour's imports serve the later blocks).  A line ending in a comment that
starts with ``# [`` or ``# (`` shows what the line before it prints: a list
or tuple literal, with ``...`` for "and more"; its shown items must be the
value's first items.

The README stays a short page for users (the study notebooks live beside
their results, ``results/<study>/README.md``), every relative link of the
README and of ``docs/*.md`` resolves inside the repository, and the hand-typed
run tables of the notebooks are the committed logs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CPU_PTB_NOTEBOOK = ROOT / "results" / "cpu-ptb" / "README.md"
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
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


def test_the_readme_is_a_short_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; study notes go to results/<study>/README.md"


def _relative_links(doc: Path) -> list[str]:
    """The link targets of a Markdown file outside code blocks, less web
    addresses and in-page anchors (``#...``)."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in LINK.findall(text) if "://" not in t and not t.startswith(("#", "mailto:"))]


def test_link_finder_sees_links_and_skips_code(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[a](a.md) ![b](img/b.png) [w](https://x.org) [h](#top)\n"
                   "```\n[c](c.md)\n```\n[d](../d.md#part)\n", encoding="utf-8")
    assert _relative_links(doc) == ["a.md", "img/b.png", "../d.md#part"]


def test_the_readme_links_to_the_docs_and_the_results():
    links = set(_relative_links(README))
    assert {"docs/user-guide.md", "docs/training.md", "results/README.md"} <= links, links


def test_no_study_number_is_typed_into_the_readme():
    """Study results (perplexities, ratios, margins) live in the generated
    CLAIMS.md and the notebooks beside them; the README's prose (code and
    `inline code` aside) has no decimal number that could go stale."""
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\b(?:Section|Theorem|Algorithm|Figure|Table)s? \d+\.\d+", "", text)  # the paper's numbering
    assert not re.findall(r"\d+\.\d+", text), re.findall(r".{30}\d+\.\d+.{10}", text)


DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md", CPU_PTB_NOTEBOOK]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc):
    bad = []
    for target in _relative_links(doc):
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in (path, *path.parents):
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)}: links that do not resolve inside the repository: {bad}"


@pytest.mark.parametrize("first, folder", [("arm", "cpu-ptb"), ("run", "cpu-ptb-clip")])
def test_the_cpu_study_tables_are_the_committed_logs(first, folder):
    """The cpu-ptb notebook's results table (and the clipping probe's, first
    column ``run``) is typed by hand; every row must be complete logs under
    results/runs/<folder> (best valid, test, best epoch, training time, seed
    by seed), and every complete log must be in it."""
    from paper_figures.logs import read_run

    text = CPU_PTB_NOTEBOOK.read_text(encoding="utf-8")
    start = text.index(f"| {first} | seeds | best valid ppl | test ppl | best epoch | training time |")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    shown = []
    for row in rows:
        arm, seeds, valid, test, epoch, minutes = [c.strip() for c in row.strip("|").split("|")]
        cols = [_numbers(c) for c in (valid, test, epoch, minutes)]
        assert all(len(c) == int(seeds) for c in cols), row
        shown += [(arm, *v) for v in zip(*cols)]
    logged = []
    for path in sorted((ROOT / "results" / "runs" / folder).glob("*.jsonl")):
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
    assert not missing and not unknown, f"complete logs not in the notebook's table: {missing}; " \
                                        f"notebook rows that are no complete log: {unknown}"
    assert got == want


def test_results_readme_names_every_results_folder():
    """results/README.md says what each folder under results/ holds and how to
    regenerate it: a new folder without a row there fails here."""
    text = (ROOT / "results" / "README.md").read_text(encoding="utf-8")
    folders = sorted(p.name for p in (ROOT / "results").iterdir() if p.is_dir())
    missing = [f for f in folders if f"{f}/" not in text]
    assert folders and not missing, f"results/README.md has no row for: {missing}"


GPT2_NOTEBOOK = ROOT / "results" / "cpu-ptb-gpt2" / "README.md"
GPT2_PILOT = ROOT / "results" / "runs" / "cpu-ptb-gpt2-pilot"


def test_the_gpt2_pilot_table_is_the_one_its_logs_give():
    """The notebook's pilot table is ``python -m paper_figures.pilot`` over the committed pilot logs:
    a pilot run added without regenerating the table (or a cell typed by hand) fails here."""
    from paper_figures.pilot import pilot_table

    table = pilot_table(GPT2_PILOT)
    assert table in GPT2_NOTEBOOK.read_text(encoding="utf-8"), (
        "regenerate the table: python -m paper_figures.pilot results/runs/cpu-ptb-gpt2-pilot")
