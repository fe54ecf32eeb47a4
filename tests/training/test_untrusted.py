"""Files from someone else are untrusted (issue 30): a checkpoint, a log or a
runs folder can at worst be refused.  It never runs code, never writes
outside the runs folder, and never yields a number computed from silently
corrupted state.  Each test here failed on the code before that issue."""

from __future__ import annotations

import json
import math
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from dropcheck import DropcheckError
from dropcheck.cli import main as cli_main
from training.pipeline.files import digest_path, load_checkpoint, run_files, safe_name, save_checkpoint
from training.pipeline.trainer import train

REPO = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Pickles to a call of ``os.system``: loading it with ``weights_only=False`` runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit inside the first tensor's stored bytes (not the zip's
    structure): ``torch.load`` still reads the file, with one changed number."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 4)
    raw = bytearray(path.read_bytes())
    # local file header: 30 bytes, then the name and the extra field (their lengths at offsets 26 and 28)
    off = info.header_offset
    n_name, n_extra = int.from_bytes(raw[off + 26:off + 28], "little"), int.from_bytes(raw[off + 28:off + 30], "little")
    raw[off + 30 + n_name + n_extra + 2] ^= 0x40
    path.write_bytes(bytes(raw))


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_no_checkpoint_is_read_with_weights_only_false():
    hits = subprocess.run(["grep", "-rn", "weights_only=False", "--include=*.py", "dropcheck", "training",
                           "paper_figures", "derivations"], cwd=REPO, capture_output=True, text=True).stdout
    assert hits == ""


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_nothing_runs(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="dropout", max_steps=6, eval_every=3)
    part = train(cfg, out=tmp_path, corpus=tiny_corpus, stop_after=2)
    ckpt = torch.load(part.ckpt_path, weights_only=True)
    marker = tmp_path / "ran"
    ckpt["loop"]["evil"] = _RunsCode(marker)
    save_checkpoint(ckpt, part.ckpt_path)  # its SHA-256 record forged too: weights_only is what refuses it
    with pytest.raises(DropcheckError) as err:
        train(cfg, out=tmp_path, corpus=tiny_corpus, resume=True)
    assert "refused" in _one_line(err.value) and str(part.ckpt_path) in str(err.value)
    assert not marker.exists()


def test_the_cli_refuses_a_doctored_checkpoint_in_one_line(tiny_corpus_dir, tmp_path, capsys):
    from tests.training.conftest import TINY

    over = [f"{k}={v}" for k, v in {**TINY, "rule": "none", "max_steps": 6, "run_name": "doctored"}.items()]
    base = ["train", "--config", "smoke", "--data", str(tiny_corpus_dir), "--out", str(tmp_path)]
    assert cli_main(base + ["--stop-after", "2"] + over) == 0
    ckpt_path = run_files(tmp_path, "doctored").ckpt
    marker = tmp_path / "ran"
    save_checkpoint({"version": 1, "payload": _RunsCode(marker)}, ckpt_path)
    capsys.readouterr()
    assert cli_main(base + ["--resume"] + over) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_study_checkpoint_refuses_a_doctored_best_model(tmp_path):
    from training.pipeline.factories import study_checkpoint

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "cpu-ptb-none-s1.jsonl").write_text(json.dumps({"type": "header", "config": {"rule": "none"}}) + "\n")
    marker = tmp_path / "ran"
    save_checkpoint({"model": {}, "x": _RunsCode(marker)}, runs / "cpu-ptb-none-s1.best.pt")
    with pytest.raises(DropcheckError, match="refused"):
        study_checkpoint("cpu-ptb-none-s1", runs_dir=runs)
    assert not marker.exists()


def test_a_bit_flipped_checkpoint_is_refused_naming_the_file(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="dropout", max_steps=6, eval_every=3)
    part = train(cfg, out=tmp_path, corpus=tiny_corpus, stop_after=4)
    _flip_a_weight_bit(part.ckpt_path)
    torch.load(part.ckpt_path, weights_only=True)  # the flip leaves a readable file: only the digest tells
    with pytest.raises(DropcheckError, match="damaged or was changed") as err:
        train(cfg, out=tmp_path, corpus=tiny_corpus, resume=True)
    assert str(part.ckpt_path) in _one_line(err.value)


def test_a_kill_between_the_record_and_the_file_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch):
    """``save_checkpoint`` writes the record before it replaces the file: the
    record names both the new digest and the one on disk, so a kill between
    the two leaves the old checkpoint, which still loads."""
    import training.pipeline.files as files

    path = tmp_path / "r.ckpt.pt"
    save_checkpoint({"step": 1}, path)
    real = os.replace

    def killed(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # the process dies before the checkpoint lands
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(files.os, "replace", real)
    assert load_checkpoint(path) == {"step": 1}
    assert not list(tmp_path.glob(".*.tmp"))
    save_checkpoint({"step": 3}, path)
    assert load_checkpoint(path) == {"step": 3}
    path.write_bytes(torch.load.__doc__.encode()[:10])  # then damaged: neither digest matches
    with pytest.raises(DropcheckError, match="damaged or was changed"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", os.urandom(256)], ids=["empty", "truncated", "random"])
def test_an_unreadable_checkpoint_is_one_error_line(tmp_path, content):
    path = tmp_path / "r.ckpt.pt"
    path.write_bytes(content)  # no SHA-256 record: read unverified (with a warning), and still refused cleanly
    with pytest.raises(DropcheckError) as err:
        load_checkpoint(path)
    assert str(path) in _one_line(err.value)


def test_a_checkpoint_without_a_record_loads_with_a_warning(tmp_path, capsys):
    path = tmp_path / "old.ckpt.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)  # as dropcheck wrote them before it kept records
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert "cannot be verified" in capsys.readouterr().err


# --- paths -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "x" * 300, ".hidden", "a\nb", "a..b"])
def test_safe_name_refuses_what_is_not_one_plain_component(name):
    with pytest.raises(DropcheckError):
        safe_name(name)


def test_safe_name_keeps_the_study_names():
    from training.studies.study import PLANS

    for plan in PLANS.values():
        for a in plan.arms:
            assert safe_name(plan.run_name(a.name, 12)) == plan.run_name(a.name, 12)


def test_a_300_character_run_name_is_one_error_line(tiny_cfg, tiny_corpus, tmp_path):
    with pytest.raises(DropcheckError) as err:
        train(tiny_cfg(run_name="r" * 300), out=tmp_path, corpus=tiny_corpus)
    assert "at most" in _one_line(err.value)


def test_recheck_refuses_a_log_header_that_would_write_outside_the_runs_folder(tiny_cfg, tmp_path, monkeypatch,
                                                                             tiny_corpus_dir):
    import tempfile

    from training.studies.reproduce import recheck
    from training.studies.study import PLANS

    runs = tmp_path / "runs"
    runs.mkdir()
    scratch = tmp_path / "scratch" / "deep"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # recheck's temporary run folder is made here
    recs = [{"type": "header", "run_name": "victim-s1", "config_name": "../../escaped",
             "config": tiny_cfg(rule="none", max_steps=2)},
            {"type": "eval", "step": 2, "valid_ppl": 10.0}]
    (runs / "victim-s1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DropcheckError, match="config_name"):
        recheck(PLANS["tiny"], runs, "victim-s1", str(tiny_corpus_dir), 0.01)
    assert not [p for p in tmp_path.rglob("escaped*")]


def test_recheck_refuses_a_run_argument_that_is_a_path(tmp_path):
    from training.studies.reproduce import recheck
    from training.studies.study import PLANS

    with pytest.raises(DropcheckError, match="one plain file name"):
        recheck(PLANS["tiny"], tmp_path, "../elsewhere", None, 0.01)


def test_a_symlinked_lock_is_refused_not_followed(tiny_cfg, tiny_corpus, tmp_path):
    victim = tmp_path / "outside" / "victim"
    victim.parent.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked.lock").symlink_to(victim)
    with pytest.raises(DropcheckError, match="symbolic link"):
        train(tiny_cfg(rule="none", max_steps=2, run_name="linked"), out=runs, corpus=tiny_corpus)
    assert not victim.exists() and not (runs / "linked.jsonl").exists()


def test_the_drivers_output_file_is_not_followed_through_a_symlink(tmp_path, monkeypatch):
    import training.studies.reproduce as reproduce
    from training.studies.study import Arm, Plan

    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda cmd, **kw: pytest.fail("started a run"))
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    plan = Plan("p", "smoke", (Arm("none", {"rule": "none"}, "baseline"),))
    job = reproduce.plan_jobs(plan, tmp_path, 1)[0]
    (tmp_path / f"{job.name}.out").symlink_to(victim)
    with pytest.raises(DropcheckError, match="symbolic link"):
        reproduce._launch(plan, job, tmp_path, None)
    assert victim.read_text() == "keep\n"


def test_overwrite_removes_the_old_runs_best_model(tiny_cfg, tiny_corpus, tmp_path):
    """A new run that has not improved yet (here: stopped before its first
    evaluation) must not find the old run's ``best.pt`` and its test number."""
    cfg = tiny_cfg(rule="none", max_steps=6, eval_every=3, run_name="again")
    old = train(cfg, out=tmp_path, corpus=tiny_corpus)
    assert old.best_path.exists()
    part = train(cfg, out=tmp_path, corpus=tiny_corpus, overwrite=True, stop_after=1)
    assert not part.best_path.exists()
    assert not digest_path(part.best_path).exists() and digest_path(part.ckpt_path).exists()  # the new run's record
    recs = [json.loads(line) for line in part.log_path.read_text().splitlines()]
    assert [r["type"] for r in recs] == ["header"]


# --- divergence ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [dict(lr=1e4, clip=0.25), dict(lr=1e8, clip=0.0), dict(lr=1e30, clip=0.25)],
                         ids=["clip-finite-but-overflowing", "no-clip", "clip-nan"])
def test_a_diverging_run_stops_says_so_in_its_log_and_fails(tiny_cfg, tiny_corpus, tmp_path, over):
    cfg = tiny_cfg(rule="dropout", max_steps=8, eval_every=4, **over)
    with pytest.raises(DropcheckError, match=r"diverged at step 4") as err:
        train(cfg, out=tmp_path, corpus=tiny_corpus)
    _one_line(err.value)
    name = next(tmp_path.glob("*.jsonl"))
    recs = [json.loads(line) for line in name.read_text().splitlines()]
    assert recs[-1]["type"] == "final" and recs[-1]["stop"] == "diverged" and recs[-1]["step"] == 4
    assert not any(r["type"] == "eval" and not math.isfinite(r["valid_ppl"]) for r in recs)


def test_the_cli_exits_non_zero_on_divergence(tiny_corpus_dir, tmp_path, capsys):
    from tests.training.conftest import TINY

    over = [f"{k}={v}" for k, v in {**TINY, "rule": "dropout", "lr": 1e4, "max_steps": 8, "eval_every": 4}.items()]
    rc = cli_main(["train", "--config", "smoke", "--data", str(tiny_corpus_dir), "--out", str(tmp_path)] + over)
    assert rc != 0 and "diverged at step 4" in capsys.readouterr().err


def test_a_diverged_run_is_reported_and_not_drawn(tiny_cfg, tiny_corpus, tmp_path):
    from paper_figures.logs import read_runs

    with pytest.raises(DropcheckError, match="diverged"):
        train(tiny_cfg(rule="dropout", max_steps=8, eval_every=4, lr=1e4, run_name="blown"), out=tmp_path,
              corpus=tiny_corpus)
    train(tiny_cfg(rule="none", max_steps=4, eval_every=4, run_name="fine"), out=tmp_path, corpus=tiny_corpus)
    problems: list = []
    assert [r.header["run_name"] for r in read_runs(tmp_path, problems)] == ["fine"]
    assert problems == [f"{tmp_path / 'blown.jsonl'}: the run diverged at step 4; not drawn"]


# --- corpus identity -------------------------------------------------------------------------------------------


def test_the_header_records_the_corpus_by_content_not_by_path(tiny_cfg, tiny_corpus, tmp_path):
    res = train(tiny_cfg(rule="none", max_steps=2), out=tmp_path, corpus=tiny_corpus)
    head = json.loads(res.log_path.read_text().splitlines()[0])
    ident = head["corpus"]
    assert ident["name"] == "ptb" and ident["vocab_size"] == tiny_corpus.vocab_size == head["vocab"]
    import hashlib

    assert ident["files"] == {f: hashlib.sha256((tiny_corpus.path / f).read_bytes()).hexdigest()
                              for f in ("test.txt", "train.txt", "valid.txt")}
    assert str(tiny_corpus.path) not in res.log_path.read_text()


def test_resume_refuses_another_corpus_of_the_same_vocabulary_size(tiny_cfg, tiny_corpus, tmp_path,
                                                                   make_tiny_corpus):
    from training.pipeline.data import load_corpus

    other = load_corpus(make_tiny_corpus(tmp_path / "other", seed=1))
    assert other.vocab_size == tiny_corpus.vocab_size  # same words, other text: the model's shapes agree
    cfg = tiny_cfg(rule="none", max_steps=6, eval_every=3)
    train(cfg, out=tmp_path / "r", corpus=tiny_corpus, stop_after=2)
    with pytest.raises(DropcheckError, match="another corpus") as err:
        train(cfg, out=tmp_path / "r", corpus=other, resume=True)
    _one_line(err.value)


def test_resume_with_another_vocabulary_is_one_error_line(tiny_cfg, tiny_corpus, tmp_path, make_tiny_corpus):
    from training.pipeline.data import load_corpus

    root = make_tiny_corpus(tmp_path / "bigger")
    with open(root / "train.txt", "a", encoding="utf-8") as f:
        f.write(" zebra \n")
    bigger = load_corpus(root)
    cfg = tiny_cfg(rule="none", max_steps=6, eval_every=3)
    train(cfg, out=tmp_path / "r", corpus=tiny_corpus, stop_after=2)
    with pytest.raises(DropcheckError, match="another corpus") as err:
        train(cfg, out=tmp_path / "r", corpus=bigger, resume=True)
    _one_line(err.value)


def test_a_corpus_key_that_is_not_the_folders_corpus_is_refused(tiny_cfg, tmp_path, make_tiny_corpus):
    from dropcheck import DataError

    folder = make_tiny_corpus(tmp_path / "ptb")  # a folder named ptb: it is PTB, whatever the config says
    with pytest.raises(DataError, match="corpus=wikitext-2 but .* holds ptb"):
        train(tiny_cfg(rule="none", max_steps=2, corpus="wikitext-2"), data=str(folder), out=tmp_path / "r")
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.jsonl"))


def test_the_known_corpus_checksums_are_the_data_folders(data_root):
    """``KNOWN_CORPORA`` copies the data README's SHA-256 table: the files must have them."""
    import hashlib

    from training.pipeline.data import KNOWN_CORPORA

    for name, files in KNOWN_CORPORA.items():
        for f, digest in files.items():
            assert hashlib.sha256((data_root / name / f).read_bytes()).hexdigest() == digest, (name, f)


def test_recheck_refuses_a_log_of_another_corpus(tiny_cfg, tiny_corpus_dir, tmp_path, make_tiny_corpus):
    from training.studies.reproduce import recheck
    from training.studies.study import PLANS

    runs = tmp_path / "runs"
    res = train(tiny_cfg(rule="none", max_steps=4, eval_every=2, run_name="mine-s1"), data=str(tiny_corpus_dir),
                out=runs)
    assert res.finished
    other = make_tiny_corpus(tmp_path / "other", seed=3)
    with pytest.raises(DropcheckError, match="another corpus"):
        recheck(PLANS["tiny"], runs, "mine-s1", str(other), 0.01)


def test_no_committed_log_header_holds_an_absolute_path():
    """Headers name the corpus by content; a machine's paths do not belong in shared logs."""
    found = []
    for log in sorted((REPO / "results" / "runs").rglob("*.jsonl")):
        head = json.loads(log.read_text(encoding="utf-8").splitlines()[0])

        def walk(v, key):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(x, f"{key}.{k}")
            elif isinstance(v, str) and (v.startswith("/") or v.startswith("~") or v[1:3] == ":\\"):
                found.append(f"{log.relative_to(REPO)}: {key} = {v}")

        walk(head, "header")
    assert found == []


def test_a_run_with_an_unresolvable_fd_step_stops_instead_of_logging_zero(tiny_cfg, tiny_corpus, tmp_path):
    """``eps=1e-9`` in float32: both probe passes were the clean one and the
    log said ``R: 0.0`` under ``rule=explicit``; now the first step refuses."""
    with pytest.raises(DropcheckError, match="below what torch.float32 resolves") as err:
        train(tiny_cfg(rule="explicit", estimator="fd", eps=1e-9, max_steps=2), out=tmp_path, corpus=tiny_corpus)
    _one_line(err.value)


def test_draw_only_takes_the_plans_own_runs_not_those_that_share_its_prefix(tmp_path):
    """``reproduce --plan cpu-ptb --runs results/runs`` pooled cpu-ptb-cuda's and
    the clip study's DROPOUT_1 logs (their names begin ``cpu-ptb-``) into the
    plan's arms."""
    from training.studies.reproduce import _complete_runs
    from training.studies.study import PLANS

    plan = PLANS["tiny"]
    arm = plan.arms[0].name
    for name in (plan.run_name(arm, 1), f"tiny-cuda-{arm}-s1", f"tiny-{arm}-clip0.5-s1"):
        recs = [{"type": "header", "run_name": name, "config": {"rule": "dropout"}},
                {"type": "final", "best_valid_ppl": 100.0, "best_step": 1, "test_ppl": 90.0, "wall_time": 1.0}]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r.header["run_name"] for r in _complete_runs(plan, tmp_path)] == [plan.run_name(arm, 1)]


# --- the study driver ------------------------------------------------------------------------------------------


def test_arms_that_match_nothing_are_an_error_listing_the_arms(tmp_path, capsys):
    rc = cli_main(["reproduce", "--plan", "tiny", "--runs", str(tmp_path), "--arms", "dropuot-*", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--arms dropuot-* matches no arm of plan 'tiny'; its arms: " in err
    from training.studies.study import PLANS

    assert all(a.name in err for a in PLANS["tiny"].arms) and "every run is done" not in err


def test_a_run_another_driver_takes_first_is_reported_held_not_failed(tmp_path, tiny_corpus_dir, monkeypatch):
    """Driver A looked (the run was free), driver B took the run's lock, then
    A started it: A's process is refused by the lock.  A reports it held by
    another process, does not start it again, and does not count it failed."""
    import training.studies.reproduce as reproduce
    from training.pipeline.files import run_lock
    from training.studies.study import Arm, Plan

    plan = Plan("held", "smoke", (Arm("none", {"rule": "none"}, "baseline"),),
                extra={"emb": 5, "hidden": 6, "layers": 2, "bptt": 6, "batch_size": 4, "eval_batch_size": 2,
                       "test_batch_size": 2, "max_steps": 4, "train_tokens": 0, "valid_tokens": 0, "test_tokens": 0})
    name = plan.run_name("none", 1)
    launched = []
    real_launch = reproduce._launch
    monkeypatch.setattr(reproduce, "is_locked", lambda path: False)  # A's look came before B took the lock
    monkeypatch.setattr(reproduce, "_launch", lambda *a, **k: launched.append(a[1].name) or real_launch(*a, **k))
    with run_lock(run_files(tmp_path, name).lock):  # driver B's job
        outcome = reproduce.run_plan(plan, tmp_path, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2)
    assert outcome == ([], []) and launched == [name]
    assert "already running in another process" in run_files(tmp_path, name).out.read_text()


def test_a_log_with_a_damaged_header_is_backed_up_and_started_again_once(tmp_path, tiny_corpus_dir):
    from training.studies.reproduce import run_plan, run_state
    from training.studies.study import Arm, Plan

    plan = Plan("dmg", "smoke", (Arm("none", {"rule": "none"}, "baseline"),),
                extra={"emb": 5, "hidden": 6, "layers": 2, "bptt": 6, "batch_size": 4, "eval_batch_size": 2,
                       "test_batch_size": 2, "max_steps": 4, "train_tokens": 0, "valid_tokens": 0, "test_tokens": 0})
    files = run_files(tmp_path, plan.run_name("none", 1))
    files.log.write_text('{"type": "head\x00er", garbage\n{"type": "eval", "step": 2, "valid_ppl": 5.0}\n')
    files.ckpt.write_bytes(b"a checkpoint of some other run")
    assert run_state(tmp_path, files.log.stem) == "broken"  # not "interrupted": its log cannot be resumed
    assert run_plan(plan, tmp_path, jobs=1, data=str(tiny_corpus_dir), progress=False, poll=0.2) == ([], [])
    assert run_state(tmp_path, files.log.stem) == "done"
    backups = list(tmp_path.glob(f"{files.log.name}.broken-*"))
    assert len(backups) == 1 and "garbage" in backups[0].read_text()
    assert "moved to" in files.out.read_text()


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="none", max_steps=4, eval_every=2, run_name="litter")
    train(cfg, out=tmp_path, corpus=tiny_corpus, stop_after=2)
    stale = [tmp_path / ".litter.ckpt.pt.k1ll3d.tmp", tmp_path / ".litter.best.pt.x.tmp",
             tmp_path / ".litter.jsonl.y.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    other = tmp_path / ".other-run.ckpt.pt.z.tmp"  # another run's: not ours to remove
    other.write_bytes(b"theirs")
    assert train(cfg, out=tmp_path, corpus=tiny_corpus, resume=True).finished
    assert not any(p.exists() for p in stale) and other.exists()


# --- one error line where there was a traceback ----------------------------------------------------------------


def _train_argv(tiny_corpus_dir, out, **over):
    from tests.training.conftest import TINY

    over = {**TINY, "rule": "none", "max_steps": 4, "eval_every": 2, "run_name": "r", **over}
    return ["train", "--config", "smoke", "--data", str(tiny_corpus_dir), "--out", str(out)] + \
        [f"{k}={v}" for k, v in over.items()]


def test_out_pointing_at_a_file_is_one_error_line(tiny_corpus_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert cli_main(_train_argv(tiny_corpus_dir, tmp_path / "afile")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "afile" in err and "Traceback" not in err


@pytest.mark.parametrize("errno_, text", [("ENOSPC", "No space left on device"), ("EROFS", "Read-only file system")])
def test_a_full_disk_or_read_only_output_is_one_error_line_and_no_litter(tiny_corpus_dir, tmp_path, capsys,
                                                                        monkeypatch, errno_, text):
    """Simulated (the tests run as root, which ignores permissions): every
    flush to disk of a run's files fails with that error."""
    import errno

    import training.pipeline.files as files

    def fail(fd):
        raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))

    monkeypatch.setattr(files.os, "fsync", fail)
    assert cli_main(_train_argv(tiny_corpus_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and text in err
    assert not list(tmp_path.glob(".*.tmp"))  # the failed atomic write removed its temporary file


def test_a_damaged_line_inside_the_checkpointed_part_of_the_log_is_refused_on_resume(tiny_cfg, tiny_corpus, tmp_path):
    cfg = tiny_cfg(rule="none", max_steps=8, eval_every=2, checkpoint_every=0)
    part = train(cfg, out=tmp_path, corpus=tiny_corpus, stop_after=4)
    lines = part.log_path.read_text().splitlines()
    assert json.loads(lines[1])["type"] == "eval"
    lines[1] = lines[1][: len(lines[1]) // 2]  # an evaluation the checkpoint counts, cut in half
    part.log_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DropcheckError, match="line 2") as err:
        train(cfg, out=tmp_path, corpus=tiny_corpus, resume=True)
    assert str(part.log_path) in _one_line(err.value)


@pytest.mark.parametrize("field, value", [("valid_ppl", "abc"), ("step", "ten"), ("valid_ppl", None)])
def test_wrongly_typed_eval_fields_are_reported_and_skipped(tmp_path, field, value):
    from paper_figures.logs import read_run

    recs = [{"type": "header", "run_name": "x-s1", "config": {"rule": "none"}},
            {"type": "eval", "step": 2, "epoch": 1.0, "valid_ppl": 50.0},
            {"type": "eval", "step": 4, "epoch": 2.0, "valid_ppl": 40.0, field: value},
            {"type": "final", "step": 4, "best_step": 4, "best_valid_ppl": "forty", "test_ppl": 30.0}]
    path = tmp_path / "x-s1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    problems: list = []
    run = read_run(path, problems)
    assert [e["step"] for e in run.evals] == [2] and run.final is None
    assert any(":3: eval line" in p for p in problems) and any(":4: final line" in p for p in problems)


def test_figures_and_status_survive_wrongly_typed_log_fields(tmp_path, capsys):
    from training.studies.reproduce import print_status
    from training.studies.study import Arm, Plan

    runs = tmp_path / "runs"
    runs.mkdir()
    recs = [{"type": "header", "run_name": "typ-a-s1", "config": "not a dict"},
            {"type": "final", "step": 4, "best_step": 4, "best_valid_ppl": 40.0, "test_ppl": 30.0, "wall_time": "x"}]
    (runs / "typ-a-s1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recs = [{"type": "header", "run_name": "typ-b-s1", "config": {"rule": "none", "corpus": "ptb"}},
            {"type": "eval", "step": "4", "epoch": 2.0, "valid_ppl": 40.0},
            {"type": "final", "step": 4, "best_step": 4, "best_valid_ppl": 40.0, "test_ppl": 30.0, "wall_time": 1}]
    (runs / "typ-b-s1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli_main(["figures", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    plan = Plan("typ", "smoke", (Arm("a", {"rule": "none"}, "baseline"), Arm("b", {"rule": "none"}, "baseline")))
    print_status(plan, runs, 1, None)
    out = capsys.readouterr().out
    assert "done         typ-b-s1" in out


def test_a_byte_order_mark_does_not_become_a_word(tmp_path, make_tiny_corpus):
    from training.pipeline.data import load_corpus

    root = make_tiny_corpus(tmp_path / "bom")
    plain = load_corpus(root)
    for f in ("train.txt", "valid.txt"):
        (root / f).write_bytes(b"\xef\xbb\xbf" + (root / f).read_bytes())
    bom = load_corpus(root)
    assert bom.dictionary.idx2word == plain.dictionary.idx2word
    assert torch.equal(bom.train, plain.train) and torch.equal(bom.valid, plain.valid)


def test_draw_refuses_seeds_of_one_arm_that_differ_in_another_key(tmp_path, capsys):
    from training.studies.study import PLANS

    plan = PLANS["tiny"]
    arm = plan.arms[0].name
    for seed, clip in ((1, 0.25), (2, 0.5)):
        name = plan.run_name(arm, seed)
        recs = [{"type": "header", "run_name": name, "config": {"rule": "none", "seed": seed, "clip": clip}},
                {"type": "eval", "step": 2, "epoch": 1.0, "valid_ppl": 100.0},
                {"type": "final", "best_valid_ppl": 100.0, "best_step": 2, "test_ppl": 90.0, "wall_time": 1.0}]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc = cli_main(["reproduce", "--plan", "tiny", "--draw-only", "--runs", str(tmp_path), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"the seeds of tiny-{arm} differ in clip" in err
