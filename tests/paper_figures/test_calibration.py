"""Calibration: the judge fed the paper's own numbers must say what the paper says.

Logs are built from the paper's Table 1 (PTB, validation perplexity; the
numbers quoted in ``paper_figures/tables.py``'s ``PAPER_PTB``): two seeds per
arm at the reported value ± 0.25 (a nominal seed spread), every arm the same
20 epochs and the same curve shape, written as JSON-lines logs and read back
through ``paper_figures.logs`` like the study's own.  Every part of a claim
that Table 1 speaks to must come out as the paper states it:

- C6, both parts (identity H_out 108.76 against ℓ2 112.04 closes 12% of the
  gap to R_approx 84.52, under the 25% threshold; R̃_approx + ξ_approx 79.54
  is clearly worse than DROPOUT_1 73.76): the claim is *reproduced*;
- C5's first half (R_approx + ξ_approx 72.99 against DROPOUT_1 73.76);
- C3's second half (R_approx alone 84.52 short of DROPOUT_1);
- C5's speed half is not in Table 1 (Figure 5): logs of one curve shape
  must not pass it;

and each must flip when its pattern is taken out.  Table 1 has no DROPOUT_k
for k > 1 and no injections (those are Figures 1-4), so C1, C2 and C4 are
*not yet run*, never passed.  Table 2 (C7) joins through
``noise.compare_gaps`` once a transformer study exists
(``test_claims.test_compare_gaps_on_table2_numbers``).
"""

from __future__ import annotations

import json

import pytest

from paper_figures.claims import collect, judge
from paper_figures.logs import read_runs
from paper_figures.tables import PAPER_PTB

SPREAD = 0.25
EPOCHS = 20

# Table 1's methods as configs of our rules
CONFIGS = {
    "no dropout": {"rule": "none"},
    "identity H_out": {"rule": "identity_hessian", "explicit_mult": 1.0},
    "ℓ2": {"rule": "l2", "l2": 1e-6},
    "R̃_approx": {"rule": "loss_jacobian", "explicit_mult": 1.0},
    "R_approx": {"rule": "explicit", "explicit_mult": 1.0},
    "DROPOUT_1": {"rule": "dropout", "k": 1},
    "R̃_approx + ξ_approx": {"rule": "loss_jacobian", "explicit_mult": 1.0, "ablation_noise": True},
    "R_approx + ξ_approx": {"rule": "explicit_implicit", "explicit_mult": 1.0},
}


def _write_logs(folder, values: dict) -> None:
    for i, (method, best) in enumerate(values.items()):
        arm = f"t1-arm{i}"
        for seed, v in ((1, best - SPREAD), (2, best + SPREAD)):
            name = f"{arm}-s{seed}"
            cfg = {"corpus": "ptb", "k": 1, **CONFIGS[method], "seed": seed, "epochs": EPOCHS}
            recs = [{"type": "header", "run_name": name, "config": cfg, "config_name": "table1", "device": "cpu"}]
            for e in range(1, EPOCHS + 1):  # the same shape for every arm, its best at the last epoch
                recs.append({"type": "eval", "step": 100 * e, "epoch": float(e), "tokens_seen": 929_000 * e,
                             "valid_ppl": v + 400.0 * 0.7 ** (e - 1) - 400.0 * 0.7 ** (EPOCHS - 1)})
            recs.append({"type": "final", "step": 100 * EPOCHS, "best_step": 100 * EPOCHS, "best_valid_ppl": v,
                         "test_ppl": v, "stop": "patience", "wall_time": 1.0})
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _judge(tmp_path, **changed) -> dict:
    values = {**PAPER_PTB, **changed}
    folder = tmp_path / "runs"
    folder.mkdir()
    _write_logs(folder, values)
    problems: list = []
    runs = read_runs(folder, problems)
    assert not problems and len(runs) == 2 * len(values)
    return {c["id"]: c for c in judge(collect(runs), "Table 1")}


def _part(claim: dict, start: str) -> str:
    return next(p["verdict"] for p in claim["parts"] if p["part"].startswith(start))


def test_table1_numbers_reproduce_what_they_support(tmp_path):
    v = _judge(tmp_path)
    assert v["C6"]["verdict"] == "reproduced"
    assert "closes 12% of the gap" in v["C6"]["summary"]
    assert _part(v["C5"], "matches DROPOUT_1") == "holds"
    assert _part(v["C3"], "short of DROPOUT_1") == "holds"
    # C5's speed half is Figure 5's, not Table 1's: curves of one shape show no speed-up, and a lower best
    # alone (72.99 against 73.76) does not pass it
    assert _part(v["C5"], "fewer epochs") == "fails" and v["C5"]["verdict"] == "partly"
    # Table 1 has no DROPOUT_k (k > 1) and no injection: those claims wait, they do not pass
    for cid in ("C1", "C2", "C4"):
        assert v[cid]["verdict"] == "not yet run"


@pytest.mark.parametrize("change, claim, part", [
    # identity H_out closing 44% of the ℓ2 -> R_approx gap is better than ℓ2
    ({"identity H_out": 100.0}, "C6", "identity H_out no better"),
    # R̃_approx + xi_approx level with DROPOUT_1
    ({"R̃_approx + ξ_approx": 73.9}, "C6", "R̃_approx + ξ_approx short"),
    # R_approx + xi_approx clearly short of DROPOUT_1
    ({"R_approx + ξ_approx": 76.0}, "C5", "matches DROPOUT_1"),
    # R_approx alone level with DROPOUT_1
    ({"R_approx": 73.5}, "C3", "short of DROPOUT_1"),
])
def test_each_supported_part_flips_without_its_pattern(tmp_path, change, claim, part):
    v = _judge(tmp_path, **change)
    assert _part(v[claim], part) == "fails"
    if claim == "C6":
        assert v["C6"]["verdict"] == "partly"
