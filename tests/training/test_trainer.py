"""The training loop: logs, checkpoints, resume equals an uninterrupted run
bit for bit, best-validation model for test, the CLI end to end."""

from __future__ import annotations

import json
import math
import signal
import subprocess

import pytest
import torch

from dropcheck import DropcheckError
from training.pipeline.trainer import train

TIME_FIELDS = ("wall_time", "tokens_per_s")


def _records(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return recs


def _comparable(recs):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in recs if r["type"] in ("eval", "final")]


@pytest.mark.parametrize(
    "over",
    [
        # crosses epoch boundaries (hidden reset), variable BPTT, k masks + ξ_approx
        dict(rule="dropout_implicit", k=2, train_tokens=200, epochs=3, max_steps=14, eval_every=0),
        dict(rule="explicit_implicit", estimator="sampled", max_steps=7, eval_every=3, dtype="float64"),
        # GPT-2: functional attention dropout, the shared-probe fast path, crossing epochs
        dict(arch="gpt2", rule="explicit_implicit", estimator="fd_shared", train_tokens=200, epochs=3,
             max_steps=14, eval_every=0),
        dict(arch="gpt2", rule="dropout_implicit", k=2, max_steps=7, eval_every=3, dtype="float64"),
    ],
)
def test_resume_gives_the_same_numbers_bit_for_bit(tiny_cfg, tiny_corpus, tmp_path, over):
    cfg = tiny_cfg(**over)
    full = train(cfg, out=tmp_path / "full", corpus=tiny_corpus)
    assert full.finished
    part = train(cfg, out=tmp_path / "part", corpus=tiny_corpus, stop_after=5)
    assert not part.finished and part.step == 5
    # an interruption after the checkpoint: lines written later must not survive the resume
    with open(part.log_path, "a") as f:
        f.write('{"type": "eval", "step": 999}\n')
    with pytest.raises(DropcheckError, match="already exists"):
        train(cfg, out=tmp_path / "part", corpus=tiny_corpus)
    resumed = train(cfg, out=tmp_path / "part", corpus=tiny_corpus, resume=True)
    assert resumed.finished and resumed.step == full.step
    for k, v in full.last_state.items():
        assert torch.equal(v, resumed.last_state[k]), k
    a, b = _records(full.log_path), _records(resumed.log_path)
    assert _comparable(a) == _comparable(b)
    assert [r["type"] for r in b].count("resume") == 1
    assert not any(r.get("step") == 999 for r in b)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_step_with_a_checkpoint_and_resume_is_exact(
        tiny_cfg, tiny_corpus, tmp_path, monkeypatch, signum):
    """SIGTERM (a batch system, ``reproduce``'s stop) or Ctrl-C mid-run: the loop
    finishes the step, checkpoints it (the evaluations and checkpoint_every
    would only have saved steps 3 and 4) and returns; the resumed run is the uninterrupted one bit for bit."""
    import training.pipeline.trainer as trainer

    cfg = tiny_cfg(rule="dropout", max_steps=9, eval_every=3, checkpoint_every=4)
    full = train(cfg, out=tmp_path / "full", corpus=tiny_corpus)
    real_step = trainer._train_step

    def step_then_signal(tr, *args):
        out = real_step(tr, *args)
        if tr.state.counters.step == 5:
            signal.raise_signal(signum)  # arrives in step 5, between the saves of steps 4 and 6
        elif tr.state.counters.step == 6:
            signal.raise_signal(signum)  # never sent: the loop stops at the boundary after step 5
        return out

    before = signal.getsignal(signum)
    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    part = train(cfg, out=tmp_path / "part", corpus=tiny_corpus)
    assert signal.getsignal(signum) is before  # the handlers are put back
    assert not part.finished and part.stop_signal == signum and part.step == 5
    assert torch.load(part.ckpt_path, weights_only=False)["loop"]["step"] == 5  # nothing lost
    monkeypatch.setattr(trainer, "_train_step", real_step)
    resumed = train(cfg, out=tmp_path / "part", corpus=tiny_corpus, resume=True)
    assert resumed.finished and resumed.stop_signal is None
    for k, v in full.last_state.items():
        assert torch.equal(v, resumed.last_state[k]), k
    assert _comparable(_records(full.log_path)) == _comparable(_records(resumed.log_path))


def test_a_run_that_is_running_elsewhere_is_refused(tiny_cfg, tiny_corpus, tmp_path):
    """``<run>.lock``: two processes never write one run's log and checkpoints
    (a second driver, a resume typed while the run goes on)."""
    from training.pipeline.files import is_locked, run_lock

    cfg = tiny_cfg(rule="none", max_steps=2, run_name="locked-s1")
    with run_lock(tmp_path / "locked-s1.lock"):  # as a running `dropcheck train` holds it
        assert is_locked(tmp_path / "locked-s1.lock")
        with pytest.raises(DropcheckError, match="already running in another process"):
            train(cfg, out=tmp_path, corpus=tiny_corpus)
        assert not (tmp_path / "locked-s1.jsonl").exists()
    assert not is_locked(tmp_path / "locked-s1.lock")
    assert train(cfg, out=tmp_path, corpus=tiny_corpus).finished  # released: the run goes ahead
    assert not is_locked(tmp_path / "locked-s1.lock")  # and lets go when it ends


def test_log_contents_and_best_model_for_test(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="dropout", max_steps=9, eval_every=3, lr=8.0)
    res = train(cfg, out=tmp_path, corpus=tiny_corpus, config_name="tiny")
    recs = _records(res.log_path)
    head = recs[0]
    assert head["type"] == "header" and head["config"] == cfg and head["seed"] == cfg["seed"]
    assert head["device"] == "cpu" and head["torch"] == torch.__version__ and "git_commit" in head
    assert head["cpu"] and head["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert head["vocab"] == len(tiny_corpus.dictionary)
    # what the figures name the run by: the registry's label (DROPOUT_1 for k = 1 in the label table); a run
    # that is no study arm records no plan, arm or claim
    assert head["rule_label"] == "DROPOUT_1"
    assert not {"plan", "arm", "claim"} & set(head)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9]
    for r in evals:
        for key in ("epoch", "train_ppl", "valid_ppl", "wall_time", "tokens_per_s", "reg"):
            assert key in r
        assert r["tokens_per_s"] > 0
        assert r["grad_norm"] > 0 and 0 <= r["clipped_frac"] <= 1
    final = recs[-1]
    assert final["type"] == "final"
    best = min(evals, key=lambda r: r["valid_ppl"])
    assert final["best_step"] == best["step"] and final["best_valid_ppl"] == best["valid_ppl"]
    assert final["valid_ppl"] == pytest.approx(best["valid_ppl"], rel=1e-6)  # the best model was reloaded
    ckpt = torch.load(res.best_path, weights_only=False)
    assert ckpt["step"] == best["step"]
    assert res.ckpt_path.exists() and not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_the_gradient_norm_is_logged_before_clipping(tiny_cfg, tiny_corpus, tmp_path):
    """One step from the same seed: the logged norm is the gradient's before
    ``clip`` shortens it (the same under a clip that never acts and one that
    always does), ``clipped_frac`` says which happened, and without ``clip``
    both are NaN."""
    first = {}
    for clip in (1e-6, 1e6, 0.0):
        cfg = tiny_cfg(rule="dropout", clip=clip, max_steps=1, eval_every=1, run_name=f"clip-{clip}")
        first[clip] = [r for r in _records(train(cfg, out=tmp_path, corpus=tiny_corpus).log_path)
                       if r["type"] == "eval"][0]
    assert first[1e-6]["grad_norm"] == first[1e6]["grad_norm"] > 1e-3
    assert (first[1e-6]["clipped_frac"], first[1e6]["clipped_frac"]) == (1.0, 0.0)
    assert math.isnan(first[0.0]["grad_norm"]) and math.isnan(first[0.0]["clipped_frac"])


def test_resume_rejects_a_different_config(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="none", max_steps=4)
    train(cfg, out=tmp_path, corpus=tiny_corpus, stop_after=2)
    with pytest.raises(DropcheckError, match=r"the config differs \(lr: 2.0 -> 3.0\)"):
        train({**cfg, "lr": 3.0}, out=tmp_path, corpus=tiny_corpus, resume=True)
    with pytest.raises(DropcheckError, match="cannot resume: no checkpoint"):
        train(cfg, out=tmp_path / "empty", corpus=tiny_corpus, resume=True)


def test_regularizer_values_are_logged(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="explicit", estimator="sampled", max_steps=2, eval_every=2)
    res = train(cfg, out=tmp_path, corpus=tiny_corpus)
    ev = [r for r in _records(res.log_path) if r["type"] == "eval"][0]
    assert {"R", "R/embedding", "R/hidden", "R/output", "R/weights", "R/rows"} <= set(ev["reg"])
    assert ev["reg"]["R"] > 0


def test_cli_smoke_on_ptb_stop_and_resume(data_root, tmp_path, capsys):
    """``dropcheck train --config smoke`` on the real PTB (full 10k vocabulary),
    two steps, interrupted after one and resumed."""
    from dropcheck.cli import main

    args = ["train", "--config", "smoke", "--data", str(data_root), "--out", str(tmp_path), "--no-progress",
            "max_steps=2", "eval_every=1", "valid_tokens=2000", "test_tokens=2000"]
    assert main(args + ["--stop-after", "1"]) == 0
    assert "stopped after 1 steps" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "smoke-dropout-k1-s1: 2 steps" in out and "test ppl" in out
    recs = _records(tmp_path / "smoke-dropout-k1-s1.jsonl")
    assert recs[0]["vocab"] == 10_000 and recs[0]["train_tokens"] == 64_000 - 64_000 % 16
    assert [r["type"] for r in recs] == ["header", "eval", "resume", "eval", "final"]
    assert recs[-1]["test_ppl"] < 10_000  # below the uniform model's


def test_git_commit_is_dirty_for_code_changes_not_for_run_logs(tmp_path):
    """A run writes its log under results/, often over a committed partial log:
    that must not mark the code it ran as changed; a changed module must."""
    from training.pipeline.trainer import _git_head

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "training").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "training" / "rules.py").write_text("x = 1\n")
    (tmp_path / "results" / "run.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "run.jsonl").write_text("{}\n{}\n")
    assert _git_head(tmp_path / "training") == sha
    (tmp_path / "training" / "rules.py").write_text("x = 2\n")
    assert _git_head(tmp_path / "training") == sha + "-dirty"
