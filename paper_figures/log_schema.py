"""The run log's schema: one module for the writer and the reader.

A run log (``<run>.jsonl``) is one JSON object a line, each with a ``type``:
one ``header`` when the run starts, an ``eval`` per evaluation, a ``resume``
where a resumed run continued, and a ``final`` at the end.  ``FIELDS`` names
every field each record may carry (docs/training.md, "The run log,
checkpoints and resume", says what they mean); ``REQUIRED`` the fields a
reader needs, ``NUMBERS`` those that must be numbers (NaN and inf included:
the logs write them).

What the figures and the claims need to name a run is written into its
header when it starts (``RULE_LABEL``; ``PLAN``, ``ARM``, ``CLAIM`` for a run
of a study plan), so that they read it from the log and import neither torch
nor the trainer; a log written before these fields existed is read the old
way (``paper_figures.logs.Run``: the label from the config, the arm from the
run name).

The writer (``training.pipeline.state.RunLog.write``) refuses a record that
``problems`` finds anything wrong with, so a field added to the trainer's
records without an entry here fails at once, in the tests; the reader
(``paper_figures.logs``) skips and reports a damaged record by the same
rules.  No torch here: the figures read logs without the trainer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

HEADER, EVAL, RESUME, FINAL = "header", "eval", "resume", "final"

# header fields that say what the run is (strings; absent from logs written before them):
RULE_LABEL = "rule_label"  # the rule's name in the paper's terms (training.pipeline.rules.REGISTRY[rule].label(config))
PLAN = "plan"  # a study arm's run: the plan (training/studies/study.py), whose runs are named <plan>-<arm>-s<seed>
ARM = "arm"  # ... the arm's name in the plan
CLAIM = "claim"  # ... the claim it serves ("C1".."C7", "T2", "baseline")

# Config keys added after the first committed logs, with the value that means what a log without the key
# ran (each is its default in training.pipeline.configs.DEFAULTS, chosen to change nothing for the runs
# made before it; tests/training/test_configs.py checks both).  A reader fills them in before comparing
# the configs of two runs, so a seed run today is a seed of the same arm as one run before the key existed.
LATER_KEYS: dict[str, Any] = {
    "arch": "awd-lstm", "heads": 4, "lstm_init": "uniform", "noise_structure": "locked",
    "q_attention": 0.0, "q_residual": 0.0, "q_head": 0.0,
    "explicit_mult_attention": 1.0, "explicit_mult_residual": 1.0,
    "implicit_mult_attention": 1.0, "implicit_mult_residual": 1.0,
    "lr_decay": 1.0, "min_improvement": 0.0, "patience": 0, "train_eval_tokens": 20_000,
}

FIELDS: dict[str, frozenset[str]] = {
    HEADER: frozenset({
        "type", "run_name", "config_name", "config", "seed", "device", "arch", "backend", "dtype",
        "world_size", "git_commit", "torch", "python", "cpu", "cpu_capability", "corpus", "vocab",
        "train_tokens", "valid_tokens", "test_tokens", "parameters", "started", RULE_LABEL, PLAN, ARM, CLAIM,
    }),
    EVAL: frozenset({
        "type", "step", "epoch", "tokens_seen", "train_loss", "train_ppl", "clean_train_loss",
        "clean_train_ppl", "valid_loss", "valid_ppl", "best_valid_ppl", "lr", "next_lr", "reg",
        "grad_norm", "clipped_frac", "wall_time", "tokens_per_s",
    }),
    RESUME: frozenset({"type", "step", "epoch", "time"}),
    FINAL: frozenset({
        "type", "step", "best_step", "best_valid_ppl", "stop", "diverged", "valid_ppl", "test_loss",
        "test_ppl", "test_tokens", "wall_time", "tokens_per_s",
    }),
}

REQUIRED: dict[str, tuple[str, ...]] = {
    HEADER: ("type", "config"),
    EVAL: ("type", "step", "valid_ppl"),
    RESUME: ("type", "step"),
    FINAL: ("type", "step"),
}

NUMBERS: dict[str, tuple[str, ...]] = {
    HEADER: (),
    EVAL: ("step", "valid_ppl", "epoch", "wall_time", "tokens_seen", "train_ppl", "best_valid_ppl"),
    RESUME: ("step",),
    FINAL: ("step", "best_step", "best_valid_ppl", "valid_ppl", "test_ppl", "wall_time", "tokens_per_s"),
}

# fields that must be non-empty strings where present
TEXTS: dict[str, tuple[str, ...]] = {HEADER: (RULE_LABEL, PLAN, ARM, CLAIM)}

STOPS = ("budget", "patience", "diverged")  # a final record's ``stop``


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mistyped(rec: Mapping[str, Any], kind: str) -> list[str]:
    """The fields of ``rec`` that ``NUMBERS`` wants numeric and are not."""
    return [k for k in NUMBERS.get(kind, ()) if k in rec and not is_number(rec[k])]


def text(rec: Mapping[str, Any], key: str) -> Optional[str]:
    """``rec[key]`` when it is a non-empty string, else ``None`` (absent from an
    older log, or damaged)."""
    v = rec.get(key)
    return v if isinstance(v, str) and v else None


def problems(rec: Mapping[str, Any]) -> list[str]:
    """What is wrong with one record: an unknown type, a missing required
    field, a field the schema does not know, a number that is not one."""
    kind = rec.get("type")
    if kind not in FIELDS:
        return [f"unknown record type {kind!r}"]
    out = [f"{kind} record without {k!r}" for k in REQUIRED[kind] if k not in rec]
    unknown = sorted(set(rec) - FIELDS[kind])
    if unknown:
        out.append(f"{kind} record with fields the log schema does not know: {unknown}")
    bad = mistyped(rec, kind)
    if bad:
        out.append(f"{kind} record with non-numeric {', '.join(bad)}")
    bad = [k for k in TEXTS.get(kind, ()) if k in rec and text(rec, k) is None]
    if bad:
        out.append(f"{kind} record whose {', '.join(bad)} is not a non-empty string")
    if kind == HEADER and not isinstance(rec.get("config"), dict):
        out.append("header record whose config is not an object")
    if kind == FINAL and "stop" in rec and rec["stop"] not in STOPS:
        out.append(f"final record with stop {rec['stop']!r}, not one of {STOPS}")
    return out
