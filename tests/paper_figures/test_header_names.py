"""What names a run comes from its log header (issue 31, item 3): the rule's
label, and a study arm's plan, arm and claim, written by the trainer when the
run starts (``paper_figures/log_schema.py`` names the fields for both sides).
A log from before those fields is named as before, from its config and run
name, so the committed figures and claims redraw byte for byte; a log that
has them is named by them, and for the committed runs the two ways agree."""

from __future__ import annotations

import json
from pathlib import Path

from paper_figures import log_schema
from paper_figures.claims import collect, write_claims
from paper_figures.figures import run_label
from paper_figures.logs import read_runs
from paper_figures.rule_labels import RULE_LABELS

ROOT = Path(__file__).resolve().parents[2]


def _log(path: Path, seed: int, header: dict, **cfg) -> None:
    cfg = {"rule": "dropout", "k": 4, "corpus": "ptb", "seed": seed, **cfg}
    recs = [{"type": "header", "run_name": path.stem, "config": cfg, "config_name": "c", "device": "cpu", **header},
            {"type": "eval", "step": 10, "epoch": 1.0, "valid_ppl": 100.0 + seed, "wall_time": 1.0},
            {"type": "final", "step": 10, "best_step": 10, "best_valid_ppl": 100.0 + seed, "test_ppl": 90.0 + seed}]
    for r in recs:
        assert not log_schema.problems(r), log_schema.problems(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_header_names_the_run_and_an_older_log_falls_back_to_config_and_run_name(tmp_path):
    new = {log_schema.RULE_LABEL: "a label only the header has", log_schema.PLAN: "p", log_schema.ARM: "dk4",
           log_schema.CLAIM: "C1"}
    _log(tmp_path / "p-dk4-s1.jsonl", 1, new)
    _log(tmp_path / "p-dk4-s2.jsonl", 2, {})  # an older seed of the same arm: no names in its header
    _log(tmp_path / "old-x-s1.jsonl", 1, {}, k=2)
    runs = {r.name: r for r in read_runs(tmp_path)}
    assert runs["p-dk4-s1"].label == "a label only the header has" == run_label(runs["p-dk4-s1"])
    table = RULE_LABELS["dropout"]
    assert runs["old-x-s1"].label == table({"k": 2}) == "DROPOUT_2"  # the label table, from the config
    assert [runs[n].arm_key for n in ("p-dk4-s1", "p-dk4-s2", "old-x-s1")] == ["p-dk4", "p-dk4", "old-x"]
    assert runs["p-dk4-s1"].claim == "C1" and runs["old-x-s1"].claim is None
    arms = collect(list(runs.values()))
    assert sorted(arms) == ["old-x", "p-dk4"] and arms["p-dk4"].seeds == 2
    assert arms["p-dk4"].label == "a label only the header has" and arms["p-dk4"].claim == "C1"
    assert arms["p-dk4"].as_json()["claim"] == "C1" and "claim" not in arms["old-x"].as_json()


def test_the_schema_refuses_a_name_field_that_is_not_a_string():
    for key in (log_schema.RULE_LABEL, log_schema.PLAN, log_schema.ARM, log_schema.CLAIM):
        for bad in ("", 3, None):
            wrong = log_schema.problems({"type": "header", "config": {}, key: bad})
            assert any(key in p for p in wrong), (key, bad, wrong)


def _strip_claims(doc):
    if isinstance(doc, dict):
        return {k: _strip_claims(v) for k, v in doc.items() if k != "claim"}
    if isinstance(doc, list):
        return [_strip_claims(v) for v in doc]
    return doc


def test_the_committed_runs_are_named_alike_with_the_header_fields_the_trainer_writes_now(tmp_path):
    """Give every committed ``cpu-ptb`` log the header fields a run started
    today gets (label from the registry, plan/arm/claim from the plan, as
    ``dropcheck train --arm`` records them): labels, arm keys and the claims
    document are those of the old logs, plus each arm's claim."""
    from training.pipeline.rules import rule_class
    from training.studies.study import get_plan

    plan = get_plan("cpu-ptb")
    src = ROOT / "results" / "runs" / "cpu-ptb"
    old = read_runs(src)
    assert len(old) > 20
    for r in old:
        arm = plan.arm(r.arm_key.removeprefix(plan.name + "-"))
        lines = r.path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        head.update({log_schema.RULE_LABEL: rule_class(r.config["rule"]).label(r.config),
                     log_schema.PLAN: plan.name, log_schema.ARM: arm.name, log_schema.CLAIM: arm.claim})
        (tmp_path / r.path.name).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n", encoding="utf-8")
    new = read_runs(tmp_path)
    assert all(log_schema.text(r.header, log_schema.PLAN) for r in new)
    by_name = {r.name: r for r in new}
    for r in old:
        n = by_name[r.name]
        assert (n.label, n.arm_key, run_label(n)) == (r.label, r.arm_key, run_label(r))
    for runs, out in ((old, tmp_path / "old"), (new, tmp_path / "new")):
        out.mkdir()
        write_claims(runs, out, plan_name=plan.name)
    assert (tmp_path / "old" / "CLAIMS.md").read_bytes() == (tmp_path / "new" / "CLAIMS.md").read_bytes()
    got = json.loads((tmp_path / "new" / "claims.json").read_text())
    assert _strip_claims(got) == _strip_claims(json.loads((tmp_path / "old" / "claims.json").read_text()))
    shown = {k: v["claim"] for c in got["claims"] for k, v in c["arms"].items()}
    assert shown and all(v == plan.arm(k.removeprefix(plan.name + "-")).claim for k, v in shown.items())
