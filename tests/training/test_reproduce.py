"""``dropcheck reproduce``: the study driver on tiny plans (a few steps per
arm, the tiny synthetic corpus), resume after a kill, and the claims code."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropcheck.cli import main as cli_main
from training.studies.reproduce import plan_jobs, run_plan, run_state
from training.pipeline.rules import REGISTRY
from training.studies.study import PLANS, Arm, Plan, best_member

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"emb": 5, "hidden": 6, "layers": 2, "bptt": 6, "batch_size": 4, "eval_batch_size": 2,
              "test_batch_size": 2, "lr": 2.0, "q_rows": 0.0}


def _final(path: Path) -> dict:
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return next(r for r in recs if r["type"] == "final")


def _records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_plans_are_valid_configs():
    from training.pipeline.configs import get_config

    for plan in PLANS.values():
        names = [a.name for a in plan.arms]
        assert len(names) == len(set(names)), plan.name
        for a in plan.arms:
            for seed in (1, 2):
                get_config(plan.config, plan.overrides(a.name, seed))  # raises on a bad key or value
        for g in plan.best_of:
            assert set(g) <= set(names)
    # the arms issue 10 asks for
    cpu = {a.name for a in PLANS["cpu-ptb"].arms}
    for need in ("none", "dropout-k1", "dropout-k2", "dropout-k4", "dropout-k8", "inject-k4", "explicit-x1",
                 "explicit-x1.5", "explicit-x2", "dropout-implicit-k2", "dropout-implicit-k4", "dropout-implicit-k8",
                 "explicit-implicit", "explicit-implicit-positions"):
        assert need in cpu
    # C6's second half runs on R̃_approx + ξ_approx at λ, fixed before it runs (issue 28)
    ljn = PLANS["cpu-ptb"].arm("loss-jacobian-noise-x1").overrides
    assert ljn["rule"] == "loss_jacobian" and ljn["ablation_noise"] is True and ljn["explicit_mult"] == 1.0
    groups = {frozenset(g) for g in PLANS["cpu-ptb"].best_of}
    assert frozenset({"identity-x1", "identity-x6"}) in groups and frozenset({"l2-1e-05", "l2-3e-05", "l2-0.0001"}) in groups
    assert sum(a.name.startswith("l2-") for a in PLANS["cpu-ptb"].arms) >= 2
    assert sum(a.name.startswith("identity-") for a in PLANS["cpu-ptb"].arms) >= 2
    assert sum(a.name.startswith("loss-jacobian-") for a in PLANS["cpu-ptb"].arms) >= 2


def test_best_member_waits_for_the_whole_group():
    assert best_member(("a", "b"), {"a": 3.0}) is None
    assert best_member(("a", "b"), {"a": 3.0, "b": None}) is None
    assert best_member(("a", "b"), {"a": 3.0, "b": 2.0}) == "b"


def test_tiny_plan_end_to_end_then_redraw_only(tmp_path, tiny_corpus_dir, monkeypatch, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["reproduce", "--plan", "tiny", "--runs", str(runs), "--out", str(out), "--data", str(tiny_corpus_dir),
            "--no-progress", "--jobs", "2", "--seeds", "2"]
    assert cli_main(args) == 0
    plan = PLANS["tiny"]
    jobs = plan_jobs(plan, runs, 2)
    assert jobs and all(j.state == "done" for j in jobs)
    # the best R_approx coefficient got its second seed (whether the other one did depends on how close
    # the tiny runs land: test_plan_jobs_adds_seeds_to_the_arms_of_close_comparisons pins that down)
    winner = best_member(plan.best_of[0], {a: _final(runs / f"tiny-{a}-s1.jsonl")["best_valid_ppl"]
                                           for a in plan.best_of[0]})
    assert (runs / f"tiny-{winner}-s2.jsonl").exists()
    # the driver marks each run as its arm (dropcheck train --arm): the header records plan, arm and claim
    for a in plan.arms:
        head = _records(runs / f"tiny-{a.name}-s1.jsonl")[0]
        assert (head["plan"], head["arm"], head["claim"]) == ("tiny", a.name, a.claim)
        assert head["rule_label"] == REGISTRY[a.overrides["rule"]].label(head["config"])
    # every eval logs the clean training perplexity beside the rule's loss
    for rec in _records(runs / "tiny-dropout-k1-s1.jsonl"):
        if rec["type"] == "eval":
            assert rec["clean_train_ppl"] > 1 and rec["train_ppl"] > 1
    doc = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in doc["claims"]] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    for c in doc["claims"]:
        assert c["verdict"] in ("reproduced", "partly", "not reproduced", "untestable here", "not yet run")
        for stats in c["arms"].values():
            assert set(stats) >= {"best_valid_ppl_mean", "best_valid_ppl_spread", "seeds"}
    c5 = doc["claims"][4]
    assert c5["arms"]["tiny-explicit-implicit"]["seeds"] == 2
    assert doc["noise_rule"]["df"] >= 1 and c5["parts"][0]["comparisons"][0]["n_a"] >= 1
    # the arm's numbers are the logs' numbers
    vals = [_final(runs / f"tiny-explicit-implicit-s{s}.jsonl")["best_valid_ppl"] for s in (1, 2)]
    assert c5["arms"]["tiny-explicit-implicit"]["best_valid_ppl_mean"] == pytest.approx(sum(vals) / 2, abs=1e-4)
    assert (out / "CLAIMS.md").exists() and (out / "table1.md").exists()
    assert "](best_valid.png)" in (out / "CLAIMS.md").read_text() and (out / "best_valid.png").exists()
    logs_before = {p.name: p.read_bytes() for p in runs.glob("*.jsonl")}
    claims_before = (out / "claims.json").read_bytes()
    (out / "claims.json").unlink()
    assert cli_main(args) == 0  # nothing left to run: only redraws
    assert {p.name: p.read_bytes() for p in runs.glob("*.jsonl")} == logs_before
    assert (out / "claims.json").read_bytes() == claims_before
    # the drawing code changed on disk while the driver ran: it draws in a new process, not with what it loaded
    import training.studies.reproduce as reproduce

    digests = iter(["at start", "changed since"])
    monkeypatch.setattr(reproduce, "_drawing_code", lambda: next(digests))
    monkeypatch.setattr(reproduce, "draw", lambda *a: pytest.fail("drew with the code loaded at start"))
    (out / "claims.json").unlink()
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "drawing in a new process" in capsys.readouterr().err
    assert (out / "claims.json").read_bytes() == claims_before


@pytest.mark.parametrize("spec, over, words", [
    ("tiny:none", {}, None),
    ("tiny:nothing", {}, "has no arm 'nothing'"),
    ("tiny-none", {}, "expected PLAN:ARM"),
    ("noplan:none", {}, "unknown plan"),
    ("tiny:none", {"rule": "dropout"}, "differs from the arm's in ['rule']"),
    ("tiny:none", {"run_name": "tiny-none-s2"}, "differs from the arm's in ['run_name']"),
    ("tiny:none", {"max_steps": 13}, "differs from the arm's in ['max_steps']"),
])
def test_arm_flag_records_the_arm_only_for_its_own_config(spec, over, words):
    """``dropcheck train --arm PLAN:ARM``: the header's plan/arm/claim are
    written only for a run whose config is that arm's (plan config, the
    plan's and the arm's overrides, the seed's run name)."""
    from dropcheck import DropcheckError
    from training.cli import study_arm
    from training.pipeline.configs import get_config

    plan = PLANS["tiny"]
    name, cfg = get_config(plan.config, [f"{k}={v}" for k, v in {**plan.overrides("none", 1), **over}.items()])
    if words is None:
        assert study_arm(spec, name, cfg) == {"plan": "tiny", "arm": "none", "claim": "baseline"}
    else:
        with pytest.raises(DropcheckError, match=re.escape(words)):
            study_arm(spec, name, cfg)
    with pytest.raises(DropcheckError, match="runs config 'smoke', not 'cpu-ptb'"):
        study_arm("tiny:none", "cpu-ptb", cfg)


def _kill_plan(max_steps: int) -> Plan:
    return Plan("killme", "smoke", (Arm("dropout-k1", {"rule": "dropout"}, "C1"),),
                extra={**TINY_MODEL, "max_steps": max_steps, "eval_every": 20, "checkpoint_every": 5,
                       "train_tokens": 0, "valid_tokens": 0, "test_tokens": 0, "train_eval_tokens": 200})


def test_resume_after_kill_gives_the_uninterrupted_numbers(tmp_path, tiny_corpus_dir):
    from training.pipeline.configs import get_config
    from training.pipeline.trainer import train

    # reference: the same run uninterrupted (in this process: same numbers, one thread)
    plan = _kill_plan(120)
    name, cfg = get_config(plan.config, {**plan.overrides("dropout-k1", 1), "progress": False})
    ref = train(cfg, data=str(tiny_corpus_dir), out=tmp_path / "ref", config_name=name)
    want = _final(ref.log_path)

    runs = tmp_path / "runs"
    code = ("import sys; sys.path.insert(0, %r); from tests.training.test_reproduce import _kill_plan; "
            "from training.studies.reproduce import run_plan; from pathlib import Path; "
            "run_plan(_kill_plan(120), Path(%r), jobs=1, data=%r, progress=False, poll=0.2)"
            % (str(REPO), str(runs), str(tiny_corpus_dir)))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = runs / "killme-dropout-k1-s1.ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its training process, mid-run
    proc.wait()
    # the killed training process holds its run lock until the kernel has reaped it (not our child)
    deadline = time.time() + 30
    while run_state(runs, "killme-dropout-k1-s1") == "running" and time.time() < deadline:
        time.sleep(0.05)
    state = run_state(runs, "killme-dropout-k1-s1")
    assert state in ("interrupted", "done")
    assert run_plan(_kill_plan(120), runs, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2) == ([], [])
    got = _final(runs / "killme-dropout-k1-s1.jsonl")
    if state == "interrupted":
        assert any(r["type"] == "resume" for r in _records(runs / "killme-dropout-k1-s1.jsonl"))
    for key in ("step", "best_step", "best_valid_ppl", "test_ppl"):
        assert got[key] == want[key], key


def test_time_limit_stops_the_jobs_at_a_checkpoint_and_exits_75(tmp_path, tiny_corpus_dir, monkeypatch, capsys):
    """``--time-limit``: the running job gets SIGTERM, finishes its step, writes a
    checkpoint there and exits; the driver starts nothing more, names what is
    left and exits 75.  The clock is the test's: time is up once the job's first
    checkpoint exists (its signal handler is in place by then).  The job runs on
    ``--threads 2``, which its log's config records (the smoke config says 1)."""
    import time as real_time
    import types

    import training.studies.reproduce as reproduce

    runs = tmp_path / "runs"
    name = "killme-dropout-k1-s1"
    plan = Plan("killme", "smoke", (Arm("dropout-k1", {"rule": "dropout"}, "C1"),
                                    Arm("none", {"rule": "none"}, "baseline")),
                extra={**_kill_plan(0).extra, "max_steps": 10**6, "epochs": 10**4})
    # the run must outlast the driver's poll: 2 epochs of the tiny corpus take
    # about a second, and CI saw one finish before the driver looked again
    clock = types.SimpleNamespace(sleep=real_time.sleep,
                                  monotonic=lambda: 1e9 if (runs / f"{name}.ckpt.pt").exists() else 0.0)
    monkeypatch.setattr(reproduce, "time", clock)
    monkeypatch.setattr(reproduce, "get_plan", lambda _: plan)
    rc = cli_main(["reproduce", "--plan", "tiny", "--runs", str(runs), "--out", str(tmp_path / "out"),
                   "--data", str(tiny_corpus_dir), "--no-progress", "--jobs", "1", "--time-limit", "1",
                   "--threads", "2"])
    assert rc == 75
    err = capsys.readouterr().err
    assert f"2 run(s) left ({name}, killme-none-s1)" in err and "nothing to draw" in err
    assert "1 at a time, 2 thread(s) each" in err
    assert _records(runs / f"{name}.jsonl")[0]["config"]["threads"] == 2
    assert run_state(runs, name) == "interrupted" and run_state(runs, "killme-none-s1") == "todo"
    out = (runs / f"{name}.out").read_text()
    m = re.search(r"stopped by SIGTERM after (\d+) steps", out)
    assert m, out
    import torch

    assert torch.load(runs / f"{name}.ckpt.pt", weights_only=False)["loop"]["step"] == int(m.group(1))
    assert not any(r["type"] == "final" for r in _records(runs / f"{name}.jsonl"))


@pytest.mark.parametrize("threads, extra, want", [(None, {}, "1"), (None, {"threads": 3}, "3"),
                                                   (2, {"threads": 3}, "2"), (None, {"threads": 0}, None)])
def test_launch_sizes_the_thread_pools_from_the_run_config(threads, extra, want, tmp_path, monkeypatch):
    """Without ``--threads`` a run's OpenMP/MKL pools take its config's
    ``threads`` (the smoke config says 1); 0 leaves the environment's size."""
    import training.studies.reproduce as reproduce

    seen = {}
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda cmd, **kw: seen.update(kw, cmd=cmd))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    plan = Plan("p", "smoke", (Arm("none", {"rule": "none"}, "baseline"),), extra=extra)
    _, _, out = reproduce._launch(plan, plan_jobs(plan, tmp_path, 1)[0], tmp_path, None, threads)
    out.close()
    assert seen["env"].get("OMP_NUM_THREADS") == want and seen["env"].get("MKL_NUM_THREADS") == want
    assert ("threads=2" in seen["cmd"]) == (threads == 2)


@pytest.mark.parametrize("flag", ["--jobs", "--seeds", "--threads"])
def test_counts_below_one_are_refused(flag, capsys):
    assert cli_main(["reproduce", "--plan", "cpu-ptb", flag, "0", "--status"]) != 0
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_a_run_held_by_another_process_is_left_to_it(tmp_path, tiny_corpus_dir, capsys):
    from training.pipeline.files import run_lock

    runs = tmp_path / "runs"
    runs.mkdir()
    name = "killme-dropout-k1-s1"
    (runs / f"{name}.jsonl").write_text('{"type": "header"}\n')
    (runs / f"{name}.ckpt.pt").write_bytes(b"theirs")
    with run_lock(runs / f"{name}.lock"):  # another driver's job
        assert run_state(runs, name) == "running"
        assert run_plan(_kill_plan(10), runs, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2) == ([], [])
        assert (runs / f"{name}.ckpt.pt").read_bytes() == b"theirs" and not (runs / f"{name}.out").exists()
    assert run_state(runs, name) == "interrupted"


def test_broken_log_starts_again_and_recheck_compares_the_first_epoch(tmp_path, tiny_corpus_dir, capsys):
    from training.studies.reproduce import recheck

    runs = tmp_path / "runs"
    runs.mkdir()
    plan = _kill_plan(10)
    (runs / "killme-dropout-k1-s1.jsonl").write_text('{"type": "header"}\n')  # killed before any checkpoint
    assert run_state(runs, "killme-dropout-k1-s1") == "broken"
    assert run_plan(plan, runs, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2) == ([], [])
    assert run_state(runs, "killme-dropout-k1-s1") == "done"

    from training.pipeline.trainer import cpu_kernels

    assert recheck(plan, runs, "killme-dropout-k1-s1", str(tiny_corpus_dir), 0.01) == 0
    out = capsys.readouterr().out
    k = cpu_kernels()
    here = f"{k['cpu']}, {k['cpu_capability']} kernels"
    assert "ok" in out and f"logged on: {here}" in out and f"re-run on: {here}" in out
    # a tampered log is caught, on the same machine without blaming the machine
    path = runs / "killme-dropout-k1-s1.jsonl"
    recs = _records(path)
    for r in recs:
        if r["type"] == "eval":
            r["valid_ppl"] *= 1.05
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert recheck(plan, runs, "killme-dropout-k1-s1", str(tiny_corpus_dir), 0.01) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "machines differ" not in out
    # a log from another kind of machine: the mismatch names the machines
    recs[0]["cpu_capability"] = "AVX2" if cpu_kernels()["cpu_capability"] != "AVX2" else "AVX512"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert recheck(plan, runs, "killme-dropout-k1-s1", str(tiny_corpus_dir), 0.01) == 1
    assert "the machines differ" in capsys.readouterr().out


def test_checkpoint_without_its_log_starts_again(tmp_path, tiny_corpus_dir):
    """A fresh checkout keeps git-ignored checkpoints but drops uncommitted
    logs; resuming would fail ('cannot resume: log ... is missing'), so such
    a run is broken and starts over."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "killme-dropout-k1-s1.ckpt.pt").write_bytes(b"stale")
    assert run_state(runs, "killme-dropout-k1-s1") == "broken"
    assert run_plan(_kill_plan(10), runs, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2) == ([], [])
    assert run_state(runs, "killme-dropout-k1-s1") == "done"


# (the claims code itself: tests/paper_figures/test_claims.py and test_calibration.py)


def _fake_log(runs: Path, name: str, cfg: dict, best: float) -> None:
    recs = [{"type": "header", "run_name": name, "config": cfg},
            {"type": "final", "best_valid_ppl": best, "best_step": 1, "test_ppl": best, "wall_time": 1.0}]
    (runs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plan_jobs_adds_the_seeds_the_claims_ask_for(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    plan = PLANS["tiny"]
    cfg = {a.name: {**plan.extra, **a.overrides} for a in plan.arms}
    for arm, vals in {"none": [130.0, 134.0], "dropout-k1": [110.0, 111.0], "explicit-x1": [120.0],
                      "explicit-x2": [105.0], "explicit-implicit": [109.0, 110.0]}.items():
        for seed, v in enumerate(vals, 1):
            _fake_log(runs, plan.run_name(arm, seed), cfg[arm], v)
    seeds = lambda: {a: max(j.seed for j in plan_jobs(plan, runs, 2) if j.arm == a) for a in cfg}  # noqa: E731
    # key arms and the best_of winner (x2, chosen on seed 1, so judged on seed 2) run 2 seeds; x1 is only
    # reported beside C5, never judged, so it keeps its one seed
    assert seeds() == {"none": 2, "dropout-k1": 2, "explicit-x1": 1, "explicit-x2": 2, "explicit-implicit": 2}
    # a third seed of DROPOUT_1: the arms compared with it get theirs (equal seed counts)
    _fake_log(runs, plan.run_name("dropout-k1", 3), cfg["dropout-k1"], 110.5)
    got = seeds()
    assert got["explicit-implicit"] == 3 and got["explicit-x2"] == 2 and got["explicit-x1"] == 1
    # x2 is judged without seed 1 (it chose x2); once its seed 2 is in, it is equalized with DROPOUT_1 too
    _fake_log(runs, plan.run_name("explicit-x2", 2), cfg["explicit-x2"], 106.0)
    assert seeds()["explicit-x2"] == 3
    # a third seed already on disk stays listed (an interrupted one resumes)
    (runs / f"{plan.run_name('explicit-x1', 3)}.jsonl").write_text("")
    assert [j.seed for j in plan_jobs(plan, runs, 2) if j.arm == "explicit-x1"] == [1, 2, 3]


def test_status_lists_the_equalizing_runs(tmp_path, capsys):
    from training.studies.reproduce import print_status

    runs = tmp_path / "runs"
    runs.mkdir()
    plan = PLANS["tiny"]
    cfg = {a.name: {**plan.extra, **a.overrides} for a in plan.arms}
    for arm, vals in {"none": [130.0, 134.0], "dropout-k1": [110.0, 111.0, 110.5], "explicit-x1": [120.0],
                      "explicit-x2": [105.0], "explicit-implicit": [109.0, 110.0]}.items():
        for seed, v in enumerate(vals, 1):
            _fake_log(runs, plan.run_name(arm, seed), cfg[arm], v)
    print_status(plan, runs, seeds=2, patterns=None)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("(seeds that equalize"))
    # R_approx + xi_approx is compared with DROPOUT_1's three seeds; x2 (chosen on seed 1) needs a seed to be judged on
    assert line.endswith("tiny-explicit-x2-s2, tiny-explicit-implicit-s3)")


def _gpu_study(env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "training" / "scripts" / "gpu_study.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_gpu_study_script_dry_run_on_cpu(tmp_path, tiny_corpus_dir):
    """training/scripts/gpu_study.sh with DRY_RUN=1 (the tiny plan on CPU): the two
    drivers, the progress loop and the packed logs a device call brings back."""
    import tarfile

    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "DATA": str(tiny_corpus_dir), "PYTHON": sys.executable, "ARMS_A": "dropout-*", "ARMS_B": "none"}
    proc = _gpu_study(env)
    assert "driver A exit 0, driver B exit 0" in proc.stdout
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        names = set(tar.getnames())
    assert {"tiny-dropout-k1-s1.jsonl", "tiny-none-s1.jsonl"} <= names and not any(n.endswith(".pt") for n in names)
    assert "done         tiny-none-s1" in (tmp_path / "out" / "status.txt").read_text()
    # a later session: the complete logs come along ($DONE), so nothing runs again
    env.update(RUNS=str(tmp_path / "runs2"), DONE=str(tmp_path / "runs"), OUT=str(tmp_path / "out2"))
    _gpu_study(env)
    for log in ("driver-a.log", "driver-b.log"):
        assert "every run is done" in (tmp_path / "out2" / log).read_text()


def test_status_estimates_the_training_left_from_complete_seeds(tmp_path, capsys):
    from training.studies.reproduce import print_status

    runs = tmp_path / "runs"
    runs.mkdir()
    plan = Plan("est", "smoke", (Arm("a", {"rule": "dropout"}, "C1", key=True), Arm("b", {"rule": "none"}, "C1")))
    for seed, minutes in ((1, 10.0), (2, 20.0)):  # arm a: two complete seeds, 15 min on average
        _fake_log(runs, f"est-a-s{seed}", {"rule": "dropout"}, 100.0)
        log = runs / f"est-a-s{seed}.jsonl"
        log.write_text(log.read_text().replace('"wall_time": 1.0', f'"wall_time": {minutes * 60}'))
    # seed 3 stopped after 6 min of training (a log with one evaluation, and its checkpoint)
    recs = [{"type": "header", "run_name": "est-a-s3", "config": {"rule": "dropout"}},
            {"type": "eval", "step": 10, "epoch": 1.0, "valid_ppl": 300.0, "wall_time": 360.0}]
    (runs / "est-a-s3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (runs / "est-a-s3.ckpt.pt").write_bytes(b"")
    print_status(plan, runs, seeds=3, patterns=None)
    out = capsys.readouterr().out
    assert re.search(r"interrupted +est-a-s3 .*6\.0 min/epoch; its arm's complete seeds took 15 min", out)
    assert re.search(r"todo +est-b-s1 *\n", out)  # arm b has no complete seed: no estimate
    # 15 - 6 min for seed 3; arm b counted as unknown
    assert "(training left: about 9 min of wall time, as the same arms' complete seeds ran; " \
           "1 run(s) of arms with no complete seed yet)" in out
