"""One log schema for the writer and the reader (``paper_figures/log_schema.py``).

Every record of every committed log is inside the schema; a record the
schema does not know is refused by the writer (``RunLog.write``) and named
by ``problems``; the trainer's own records of a short run pass (the writer
would have refused them otherwise, so the run finishing is the check).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paper_figures import log_schema

ROOT = Path(__file__).resolve().parents[2]
LOGS = sorted((ROOT / "results" / "runs").rglob("*.jsonl"))


def test_there_are_committed_logs_to_check():
    assert len(LOGS) > 20


def test_every_committed_log_record_is_in_the_schema():
    bad = []
    for path in LOGS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                bad += [f"{path.relative_to(ROOT)}:{n}: {p}" for p in log_schema.problems(json.loads(line))]
    assert not bad, bad[:10]


@pytest.mark.parametrize("rec, words", [
    ({"type": "eval", "step": 1, "valid_ppl": 9.0, "new_field": 1}, "does not know: ['new_field']"),
    ({"type": "eval", "step": 1}, "without 'valid_ppl'"),
    ({"type": "eval", "step": "one", "valid_ppl": 9.0}, "non-numeric step"),
    ({"type": "header", "config": "x"}, "config is not an object"),
    ({"type": "final", "step": 3, "stop": "tired"}, "stop 'tired'"),
    ({"type": "summary"}, "unknown record type 'summary'"),
])
def test_problems_names_what_is_wrong(rec, words):
    assert any(words in p for p in log_schema.problems(rec)), log_schema.problems(rec)


def test_a_clean_record_has_no_problems():
    assert log_schema.problems({"type": "resume", "step": 4, "epoch": 1, "time": 0.0}) == []


def test_the_writer_refuses_a_record_outside_the_schema(tmp_path):
    from dropcheck import DropcheckError
    from training.pipeline.state import RunLog

    log = RunLog(tmp_path / "r.jsonl", enabled=True)
    log.start()
    log.write({"type": "resume", "step": 4, "epoch": 1, "time": 0.0})
    with pytest.raises(DropcheckError, match="new_field"):
        log.write({"type": "eval", "step": 5, "valid_ppl": 9.0, "new_field": 1})
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1
