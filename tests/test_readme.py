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
