"""Reading run logs: tolerant of damage, loud about it.

A malformed or truncated line is reported with its file and line number and
skipped; the rest of the file is still used.  A file without a header line
cannot be attributed to an arm and is reported and skipped, and so is a run
whose ``final`` record says it diverged (``"stop": "diverged"``).  Byte-identical
copies of one log are read once (a copy is not another seed).

What names a run (``Run.label``, ``Run.arm_key``, ``Run.claim``) is read
from its header (``log_schema.RULE_LABEL``, ``PLAN``, ``ARM``, ``CLAIM``,
written by the trainer when the run starts); a log from before those fields
falls back to the label table (``arms.arm_label`` of its config) and to its
run name less ``-s<seed>``.

Seeds of one arm are runs whose configs agree in every key but the seed and
the bookkeeping keys that change no number (``BOOKKEEPING``):
``arm_config`` / ``config_key``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import log_schema
from .arms import arm_label
from .log_schema import ARM, CLAIM, EVAL, FINAL, HEADER, PLAN, RESUME, RULE_LABEL


# config keys that change no number (or name the seed's run): runs that differ only in these are seeds of one arm
BOOKKEEPING = ("seed", "run_name", "progress", "threads", "checkpoint_every")


@dataclass
class Run:
    path: Path
    header: dict
    evals: list = field(default_factory=list)
    final: Optional[dict] = None

    @property
    def config(self) -> dict:
        return self.header.get("config", {})

    @property
    def device(self) -> str:
        return str(self.header.get("device", "?"))

    @property
    def config_name(self) -> str:
        return str(self.header.get("config_name", "?"))

    @property
    def name(self) -> str:
        """The run's name (the header's, else the log file's stem)."""
        return str(self.header.get("run_name") or self.path.stem)

    @property
    def label(self) -> str:
        """The arm's name in the paper's terms, e.g. ``DROPOUT_4 + ξ̃_drop``: the
        header's ``rule_label``, else (an older log) the label table's for its config."""
        return log_schema.text(self.header, RULE_LABEL) or arm_label(self.config)

    @property
    def arm_key(self) -> str:
        """The arm its seeds share: ``<plan>-<arm>`` from the header of a study
        arm's run, else (an older log, a run outside a plan) the run name less
        ``-s<seed>``; the two agree, a plan's runs being named ``<plan>-<arm>-s<seed>``."""
        plan, arm = log_schema.text(self.header, PLAN), log_schema.text(self.header, ARM)
        if plan and arm:
            return f"{plan}-{arm}"
        return re.sub(r"-s\d+$", "", self.name)

    @property
    def claim(self) -> Optional[str]:
        """The claim a study arm's run serves (``C1``.., ``baseline``), from its header; ``None`` when not recorded."""
        return log_schema.text(self.header, CLAIM)

    def best_valid(self) -> float:
        if self.final and self.final.get("best_valid_ppl") is not None:
            return float(self.final["best_valid_ppl"])
        vals = [e["valid_ppl"] for e in self.evals if _finite(e.get("valid_ppl"))]
        return min(vals) if vals else math.nan

    def test_ppl(self) -> float:
        return float(self.final["test_ppl"]) if self.final and _finite(self.final.get("test_ppl")) else math.nan


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def read_run(path: Path, problems: list[str]) -> Optional[Run]:
    header, evals, final = None, [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                problems.append(f"{path}:{lineno}: malformed log line skipped ({exc})")
                continue
            kind = rec.get("type")
            if kind == HEADER:
                if not isinstance(rec.get("config", {}), dict) or not isinstance(rec.get("run_name", ""), str):
                    problems.append(f"{path}:{lineno}: header line with a config that is not an object or a "
                                    "run_name that is not a string skipped")
                    continue
                header = rec
            elif kind == EVAL:
                if not all(k in rec for k in log_schema.REQUIRED[EVAL]):
                    problems.append(f"{path}:{lineno}: eval line without step/valid_ppl skipped")
                    continue
                bad = log_schema.mistyped(rec, EVAL)
                if bad:
                    problems.append(f"{path}:{lineno}: eval line with non-numeric {', '.join(bad)} skipped")
                    continue
                evals.append(rec)
            elif kind == FINAL:
                bad = log_schema.mistyped(rec, FINAL)
                if bad:
                    problems.append(f"{path}:{lineno}: final line with non-numeric {', '.join(bad)} skipped")
                    continue
                final = rec
            elif kind == RESUME:
                # the log was truncated to the checkpoint: later evals replace nothing
                pass
            else:
                problems.append(f"{path}:{lineno}: unknown record type {kind!r} skipped")
    if header is None:
        problems.append(f"{path}: no header line; file skipped")
        return None
    return Run(path, header, evals, final)


def read_runs(root, problems: Optional[list[str]] = None) -> list[Run]:
    """Every ``*.jsonl`` below ``root`` (a folder or one file)."""
    problems = [] if problems is None else problems
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.jsonl"))
    runs, seen = [], {}
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest in seen:  # a copy of a log already read: counting it would add a seed that was never run
            problems.append(f"{p}: identical to {seen[digest]}; read once")
            continue
        seen[digest] = p
        r = read_run(p, problems)
        if r is not None:
            runs.append(r)
    diverged = [r for r in runs if r.final is not None and r.final.get("stop") == "diverged"]
    for r in diverged:  # its best validation perplexity predates the divergence: no arm's number
        problems.append(f"{r.path}: the run diverged at step {r.final.get('step')}; not drawn")
    return [r for r in runs if r not in diverged]


def arm_config(run: Run) -> dict:
    """The run's config without the seed and the ``BOOKKEEPING`` keys, a key
    its log predates filled in with what the log ran (``log_schema.LATER_KEYS``)."""
    return {k: v for k, v in {**log_schema.LATER_KEYS, **run.config}.items() if k not in BOOKKEEPING}


def config_key(run: Run) -> str:
    """``arm_config`` as a string: equal for the seeds of one arm, and only for them."""
    return json.dumps(arm_config(run), sort_keys=True, default=str)
