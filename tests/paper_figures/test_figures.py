"""Figure scripts on small synthetic logs: files appear, damage is reported
with file and line, and the rest is still drawn."""

from __future__ import annotations

import json

import pytest

from dropcheck.cli import main
from paper_figures import arm_label, read_runs
from paper_figures.tables import table1


def _write_run(path, rule, k=1, corpus="ptb", seed=0, ppl0=300.0, rate=0.8, extra=None, train_tokens=0):
    cfg = {"rule": rule, "k": k, "corpus": corpus, "seed": seed, "train_tokens": train_tokens, **(extra or {})}
    lines = [{"type": "header", "config": cfg, "config_name": "synthetic", "device": "cpu (synthetic)", "seed": seed}]
    for i in range(1, 6):
        lines.append({"type": "eval", "step": 100 * i, "epoch": float(i), "valid_ppl": ppl0 * rate**i,
                      "wall_time": 10.0 * i, "train_ppl": ppl0 * rate**i * 0.9})
    lines.append({"type": "final", "step": 500, "best_valid_ppl": ppl0 * rate**5, "test_ppl": ppl0 * rate**5 * 0.97})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture
def runs_dir(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    for k in (1, 2, 4):
        _write_run(d / f"dropout_k{k}.jsonl", "dropout", k=k, rate=0.8 + 0.02 * k)
    _write_run(d / "none.jsonl", "none", rate=0.9)
    _write_run(d / "inject.jsonl", "dropout_inject", k=4)
    _write_run(d / "explicit.jsonl", "explicit", rate=0.85)
    _write_run(d / "ei_s0.jsonl", "explicit_implicit", seed=0)
    _write_run(d / "ei_s1.jsonl", "explicit_implicit", seed=1, rate=0.79)
    _write_run(d / "di.jsonl", "dropout_implicit", k=2)
    _write_run(d / "idh.jsonl", "identity_hessian", rate=0.88)
    _write_run(d / "small.jsonl", "dropout", k=1, train_tokens=10000, rate=0.9)
    return d


def test_all_figures_and_tables(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["figures", "--runs", str(runs_dir), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for fig in ("figure1_dropout_k", "figure2_noise_injection", "figure3_explicit",
                "figure4_dropout_k_implicit", "figure5_explicit_implicit", "ablations"):
        assert f"{fig}_ptb.png" in names and f"{fig}_ptb.pdf" in names
        assert (out / f"{fig}_ptb.png").stat().st_size > 5000
    md = (out / "table1.md").read_text()
    assert "R_approx + ξ_approx | 2 |" in md  # two seeds grouped into one arm
    assert "73.76" in md  # the paper's DROPOUT_1 beside ours
    assert (out / "table2_pattern.md").exists()


def test_table_numbers_come_from_logs(runs_dir, tmp_path):
    runs = read_runs(runs_dir)
    paths = table1(runs, tmp_path)
    rows = {r.split(",")[1]: r for r in paths[0].read_text().splitlines()[1:]}
    best = float(rows["DROPOUT_1"].split(",")[3])
    # the full-data DROPOUT_1 run alone: 300·0.82^5 (the 10k-token run is its own arm)
    assert best == pytest.approx(300 * 0.82**5)
    assert float(rows["DROPOUT_1 [10000 train tokens]"].split(",")[3]) == pytest.approx(300 * 0.9**5)


def test_malformed_lines_are_reported_and_rest_drawn(runs_dir, tmp_path, capsys):
    bad = runs_dir / "dropout_k2.jsonl"
    text = bad.read_text().splitlines()
    text.insert(2, '{"type": "eval", "step": 2')  # truncated line
    bad.write_text("\n".join(text) + "\n" + '{"type": "eval", "step": 999, "valid_p')  # torn last line
    (runs_dir / "headless.jsonl").write_text('{"type": "eval", "step": 1, "valid_ppl": 5}\n')
    out = tmp_path / "out"
    assert main(["figures", "--runs", str(runs_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{bad}:3: malformed log line skipped" in err
    assert f"{bad}:9: malformed log line skipped" in err
    assert "headless.jsonl: no header line" in err
    runs = {r.path.name: r for r in read_runs(runs_dir)}
    assert len(runs["dropout_k2.jsonl"].evals) == 5  # the good lines are all kept
    assert (out / "figure1_dropout_k_ptb.png").exists()


def test_no_logs_is_a_clear_error(tmp_path, capsys):
    assert main(["figures", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("cfg, label", [
    ({"rule": "dropout", "k": 8}, "DROPOUT_8"),
    ({"rule": "dropout_inject", "k": 4}, "DROPOUT_4 + ξ̃_drop"),
    ({"rule": "explicit_implicit"}, "R_approx + ξ_approx"),
    ({"rule": "explicit", "explicit_mult": 2.0}, "R_approx (×2)"),
    ({"rule": "loss_jacobian", "ablation_noise": True}, "R̃_approx + ξ_approx"),
])
def test_arm_labels(cfg, label):
    assert arm_label(cfg) == label


def test_best_valid_summary_has_one_row_per_arm(runs_dir, tmp_path):
    from paper_figures.claims import collect
    from paper_figures.summary import draw_summary, summary_rows

    runs = read_runs(runs_dir, [])
    rows = summary_rows(collect(runs))
    assert len(rows) == len({r.path.stem for r in runs})  # synthetic logs: one arm per file
    means = [m for _, _, m in rows]
    assert means == sorted(means, reverse=True)  # worst at the bottom (row 0), best on top
    label, values, mean = rows[-1]
    assert label.startswith("R_approx + ξ_approx") and values == [300.0 * 0.79**5]  # ei_s1: rate 0.79
    out = tmp_path / "out"
    out.mkdir()
    assert sorted(p.name for p in draw_summary(runs, out, "p")) == ["best_valid.pdf", "best_valid.png"]
    # runs without a final line draw nothing
    for r in runs:
        r.final = None
    assert draw_summary(runs, out, "p") == []


def test_figure_titles_name_arms_not_verdicts():
    from paper_figures.figures import FIGURES

    for title, claim, _ in FIGURES.values():
        assert f"({claim})" in title
        for verdict_word in ("recovers", "gets worse", "tracks", "matches", "reproduced"):
            assert verdict_word not in title, title


def test_an_arm_keeps_its_colour_in_every_figure(runs_dir):
    from paper_figures.figures import FIGURES, arm_colours, run_label

    runs = read_runs(runs_dir, [])
    colours = arm_colours(runs)
    assert len(set(colours.values())) == len(colours)  # one colour per arm here
    # the map depends only on the set of arms, not on which figure asks or in which order the runs come
    assert arm_colours(list(reversed(runs))) == colours
    assert colours[run_label(next(r for r in runs if r.config["rule"] == "dropout" and r.config["k"] == 1
                                  and not r.config["train_tokens"]))] == colours["DROPOUT_1"]
    assert len(FIGURES) == 6


def test_mean_curve_runs_over_all_seeds_to_the_end(tmp_path):
    """A seed that stopped early keeps its best, so the mean curve ends at the mean best (the verdicts' number)."""
    from paper_figures.figures import best_so_far

    d = tmp_path / "r"
    d.mkdir()
    _write_run(d / "a.jsonl", "dropout", seed=1, rate=0.8)  # 5 epochs
    lines = (d / "a.jsonl").read_text().splitlines()
    (d / "b.jsonl").write_text("\n".join(lines[:4] + [lines[-1].replace(str(300 * 0.8**5), str(300 * 0.8**3))]) + "\n")
    runs = read_runs(d, [])
    epochs, rows = best_so_far(runs)
    assert epochs == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rows[-1] == pytest.approx([300 * 0.8**5, 300 * 0.8**3])  # the shorter seed carried forward
    assert sum(rows[-1]) / 2 == pytest.approx(sum(r.best_valid() for r in runs) / 2)


def test_wall_time_only_for_one_machine_and_thread_count(runs_dir):
    from paper_figures.figures import machine

    runs = read_runs(runs_dir, [])
    r = runs[0]
    assert machine(r) == ""  # a CPU log without its processor: not comparable
    r.header["cpu"] = "AMD EPYC"
    r.header["device"] = "cpu"
    r.config["threads"] = 2
    assert machine(r) == "AMD EPYC, 2 thread(s)"
    r.config["threads"] = 1
    assert machine(r) == "AMD EPYC, 1 thread(s)"


def test_a_figure_selector_naming_an_unregistered_rule_raises():
    """The selectors check their rule names against the registry's labels: a renamed rule raises
    instead of leaving its figure silently empty."""
    from paper_figures import figures

    assert figures._of("dropout", "none")  # registered names pass
    with pytest.raises(ValueError, match="no update rule"):
        figures._of("dropout_injected")


def test_ablations_show_the_r_approx_coefficient_c6_judges_against(tmp_path):
    """C6's first half is a share of the ℓ2 → R_approx gap, with R_approx at
    the coefficient chosen on seed 1 (``claims.pick``): the ablations figure
    shows that arm and no other coefficient."""
    from paper_figures.figures import FIGURES

    d = tmp_path / "runs"
    d.mkdir()
    for seed in (1, 2):
        _write_run(d / f"ex1-s{seed}.jsonl", "explicit", seed=seed, rate=0.85 if seed == 1 else 0.80)
        _write_run(d / f"ex2-s{seed}.jsonl", "explicit", seed=seed, rate=0.84 if seed == 1 else 0.86,
                   extra={"explicit_mult": 2.0})
    _write_run(d / "l2-s1.jsonl", "l2", seed=1, rate=0.9)
    _write_run(d / "k1-s1.jsonl", "dropout", seed=1, rate=0.86)
    runs = read_runs(d)
    pred = FIGURES["ablations"][2](runs)
    shown = sorted(r.path.stem for r in runs if pred(r))
    # ×2 is lower on seed 1 (0.84^5 < 0.85^5), though ×1 is lower on seed 2 and on the mean
    assert shown == ["ex2-s1", "ex2-s2", "k1-s1", "l2-s1"]
