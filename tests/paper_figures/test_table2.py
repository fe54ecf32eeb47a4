"""The Table 2 / C7 judge (paper_figures/table2.py), calibrated on the paper's
own Table 2: logs built from its numbers (two seeds per arm at the value
± 0.25, the same curve) must come out as the paper states, and each claim
must flip when its pattern is taken out.

Table 2 has no "no regularization" row at 0.2x; the regime check needs one,
so the logs carry a nominal 60.0 there (30% above DROPOUT_1's 46.05, the
full data's excess) and the test of the regime gate varies it.
"""

from __future__ import annotations

import json

import pytest

from paper_figures.logs import read_runs
from paper_figures.table2 import PAPER, judge, write_table2

SPREAD = 0.25
SIZES = {"1x": 1_000_000, "0.2x": 200_000}
CONFIGS = {
    "no dropout": {"rule": "none"},
    "DROPOUT_1": {"rule": "dropout", "k": 1},
    "DROPOUT_2": {"rule": "dropout", "k": 2},
    "DROPOUT_4": {"rule": "dropout", "k": 4},
    "R_approx": {"rule": "explicit", "explicit_mult": 1.0},
    "R_approx + ξ_approx": {"rule": "explicit_implicit", "explicit_mult": 1.0},
}


def _values(**change):
    v = dict(PAPER)
    v[("0.2x", "no dropout")] = 60.0
    v[("1x", "R_approx + ξ_approx")] = 23.5
    v.update({tuple(k.split("|")): x for k, x in change.items()})
    return v


def _write(folder, values):
    for (size, method), best in values.items():
        for seed, x in ((1, best - SPREAD), (2, best + SPREAD)):
            name = f"t2-{size}-{method.replace(' ', '')}-s{seed}"
            cfg = {"arch": "gpt2", "k": 1, **CONFIGS[method], "train_tokens": SIZES[size], "seed": seed}
            recs = [{"type": "header", "run_name": name, "config": cfg, "config_name": "t2", "device": "cpu"}]
            recs += [{"type": "eval", "step": 10 * e, "epoch": float(e), "valid_ppl": x + 50.0 / e - 5.0}
                     for e in range(1, 11)]
            recs.append({"type": "final", "best_valid_ppl": x, "test_ppl": x - 1.0, "step": 100})
            (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def _claims(tmp_path, change=None, **kw):
    _write(tmp_path, _values(**(change or {}), **kw))
    return {c["claim"]: c for c in judge(read_runs(tmp_path))["claims"]}


def test_the_papers_table2_is_reproduced(tmp_path):
    c = _claims(tmp_path)
    assert {k: v["verdict"] for k, v in c.items()} == {
        "T2-1x": "reproduced", "T2-0.2x": "reproduced", "C7": "reproduced", "R_approx": "reproduced"}
    assert c["C7"]["gap"]["outcome"] == "larger"
    assert c["C7"]["gap"]["gap_ab"] == pytest.approx(47.40 - 46.05)


@pytest.mark.parametrize("change, claim, verdict", [
    ({"1x|DROPOUT_4": 26.0}, "T2-1x", "partly"),  # DROPOUT_4 clearly worse on the full data (DROPOUT_2 holds)
    ({"1x|DROPOUT_4": 26.0, "1x|DROPOUT_2": 26.0}, "T2-1x", "not reproduced"),
    ({"0.2x|DROPOUT_4": 46.05}, "T2-0.2x", "not reproduced"),  # no gap at 0.2x
    ({"0.2x|DROPOUT_4": 46.05}, "C7", "not reproduced"),  # ... so no larger gap
    ({"1x|DROPOUT_4": 24.74}, "C7", "not reproduced"),  # the same 1.35 gap at both sizes
    ({"1x|R_approx": 26.0}, "R_approx", "partly"),  # clearly worse than DROPOUT_1, still better than none
    ({"1x|R_approx": 29.45}, "R_approx", "not reproduced"),  # no better than no regularization either
    ({"0.2x|no dropout": 48.0}, "C7", "untestable here"),  # the small size does not overfit
])
def test_each_claim_flips_without_its_pattern(tmp_path, change, claim, verdict):
    assert _claims(tmp_path, change)[claim]["verdict"] == verdict


def test_a_missing_arm_is_not_yet_run_never_passed(tmp_path):
    v = _values()
    del v[("0.2x", "DROPOUT_4")]
    _write(tmp_path, v)
    c = {x["claim"]: x for x in judge(read_runs(tmp_path))["claims"]}
    assert c["C7"]["verdict"] == "not yet run" and c["T2-0.2x"]["verdict"] == "not yet run"


def test_outputs_are_written_and_byte_identical(tmp_path):
    _write(tmp_path, _values())
    a, b = tmp_path / "a", tmp_path / "b"
    files = write_table2(read_runs(tmp_path), a, "t2")
    write_table2(read_runs(tmp_path), b, "t2")
    assert {p.name for p in files} >= {"claims.json", "CLAIMS.md", "table2.md", "table2.csv", "table2.png"}
    for p in files:
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    assert "| 0.2x | DROPOUT_4 | 2 | 47.40 | 0.50 |" in (a / "table2.md").read_text()
