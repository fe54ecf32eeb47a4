"""Seeds are grouped by config, not by label (issue 30): a clip-0.5 or GPU
run of DROPOUT_1 is not another seed of the CPU arm, and a copy of a log is
not another seed at all."""

from __future__ import annotations

import json

from paper_figures.figures import group_arms
from paper_figures.logs import read_runs
from paper_figures.tables import table1


def _log(path, seed, **cfg):
    cfg = {"rule": "dropout", "k": 1, "corpus": "ptb", "clip": 0.25, "device": "cpu", "threads": 1, "seed": seed,
           **cfg}
    recs = [{"type": "header", "run_name": path.stem, "config": cfg, "config_name": "c", "device": cfg["device"]},
            {"type": "eval", "step": 10, "epoch": 1.0, "valid_ppl": 100.0 + seed, "wall_time": 1.0},
            {"type": "final", "step": 10, "best_step": 10, "best_valid_ppl": 100.0 + seed, "test_ppl": 90.0 + seed}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_runs_of_one_label_that_differ_in_another_key_are_not_pooled(tmp_path):
    for seed in (1, 2):
        _log(tmp_path / f"cpu-s{seed}.jsonl", seed, threads=seed)  # threads change no number: seeds of one arm
        _log(tmp_path / f"clip-s{seed}.jsonl", seed, clip=0.5)
    _log(tmp_path / "gpu-s1.jsonl", 1, device="cuda")
    groups = group_arms(read_runs(tmp_path))
    seeds = {label: sorted(r.path.stem for r in members) for (_, label), members in groups.items()}
    assert seeds == {"DROPOUT_1 [clip=0.25, device=cpu]": ["cpu-s1", "cpu-s2"],
                     "DROPOUT_1 [clip=0.5, device=cpu]": ["clip-s1", "clip-s2"],
                     "DROPOUT_1 [clip=0.25, device=cuda]": ["gpu-s1"]}
    (tmp_path / "out").mkdir()
    md = next(p for p in table1(read_runs(tmp_path), tmp_path / "out") if p.suffix == ".md").read_text()
    assert "| DROPOUT_1 [clip=0.5, device=cpu] | 2 |" in md and "| 5 |" not in md


def test_a_label_with_one_config_keeps_its_plain_name(tmp_path):
    for seed in (1, 2):
        _log(tmp_path / f"cpu-s{seed}.jsonl", seed)
    assert [label for _, label in group_arms(read_runs(tmp_path))] == ["DROPOUT_1"]


def test_a_copied_log_is_read_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _log(tmp_path / "a" / "run-s1.jsonl", 1)
    (tmp_path / "b" / "run-s1.jsonl").write_bytes((tmp_path / "a" / "run-s1.jsonl").read_bytes())
    problems: list = []
    runs = read_runs(tmp_path, problems)
    assert [r.path.parent.name for r in runs] == ["a"]
    assert problems == [f"{tmp_path / 'b' / 'run-s1.jsonl'}: identical to {tmp_path / 'a' / 'run-s1.jsonl'}; read once"]
    (_, members), = group_arms(runs).items()
    assert len(members) == 1
