"""``dropcheck reproduce``: run a study plan to the end, then draw its results.

    dropcheck reproduce --plan cpu-ptb [--jobs 2] [--threads T] [--seeds N] [--arms PATTERN ...]
                        [--time-limit MINUTES] [--runs DIR] [--out DIR] [--data DIR]
                        [--status] [--draw-only]
    dropcheck reproduce --plan cpu-ptb --recheck RUN_NAME

Every run of the plan (``study.py``) is in one of five states, read from the
files under ``--runs`` (default ``results/runs/<plan>``):

- ``done``: its log has a final line.  Never run again.
- ``running``: a process holds its lock ``<run>.lock`` (``dropcheck
  train``'s; another driver's job, or one of this driver's): left alone.
- ``interrupted``: a log without a final line and a checkpoint
  ``<run>.ckpt.pt``: resumed (``dropcheck train --resume``, which continues
  to the same numbers as an uninterrupted run).
- ``broken``: a log without a final line and no checkpoint (killed before its
  first checkpoint), a log whose header is damaged, or a checkpoint whose log
  is gone (a fresh checkout keeps git-ignored checkpoints but not uncommitted
  logs): started again, its log first moved to ``<run>.jsonl.broken-<time>``.
- ``todo``: nothing yet.

A run whose process another driver beat to the run's lock (between this
driver's look and its start) is reported ``held`` and left to that driver,
not counted as failed.  A diverged run (``"stop": "diverged"`` in its final
line) is done, reported failed when it diverges, and not drawn.
``--arms`` patterns that match no arm are an error listing the plan's arms.

Runs go in plan order, up to ``--jobs`` at a time, each a ``dropcheck
train`` subprocess on its config's ``threads`` (1 for cpu-ptb), or on
``--threads`` threads (logged as the run's ``threads``; a resume may change
it), its output in ``<run>.out``
beside the log; a progress display shows every running job's epoch and
validation perplexity.  Then the figures, tables and claims are drawn from
the logs into ``--out`` (default ``results/<plan>``).  When every run is
done, the command only redraws.
If the code under ``paper_figures/`` or ``training/`` changed while the runs
went on, the drawing happens in a new process, so the results come from the
code on disk and not from what the driver loaded hours earlier.
A failed run is reported with the end of its output, and the command exits
with status 1 after drawing what there is.

Stopping: SIGTERM or Ctrl-C stops every running job at its next step, each
writing a checkpoint first (``dropcheck train``'s signal handling), so the
same command later resumes them without losing a step.  ``--time-limit
MINUTES`` does the same after that many minutes (a session's or a batch
job's end), then draws from the complete logs and exits with status 75
(``EX_TEMPFAIL``: run again to continue).

``--recheck RUN`` re-runs the first epoch of a committed run with its logged
config (in a temporary folder) and compares the validation perplexity of its
first evaluation with the logged one (exit 1 beyond ``--tolerance``, 1%).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from dropcheck import DropcheckError

from ..pipeline.files import is_locked, open_append, run_files, safe_name
from .study import Plan, best_member, get_plan, PLANS


# seconds a stopped job has to reach its next step and checkpoint before it is killed
_STOP_WAIT = 120.0


@dataclass
class RunJob:
    arm: str
    seed: int
    name: str
    state: str  # done | running | interrupted | broken | todo


def _read_log(runs_dir: Path, name: str) -> tuple[Optional[dict], list[dict], Optional[dict]]:
    """``(header, evals, final)`` of run ``name``'s log, read by
    ``paper_figures.logs`` (damaged lines skipped); nothing for a missing or
    header-less file."""
    from paper_figures.logs import read_run

    path = run_files(runs_dir, name).log
    run = read_run(path, []) if path.exists() else None
    return (run.header, run.evals, run.final) if run is not None else (None, [], None)


def run_state(runs_dir: Path, name: str) -> str:
    files = run_files(runs_dir, name)
    header, _, final = _read_log(runs_dir, name)
    if final is not None and header is not None:
        return "done"
    if is_locked(files.lock):
        return "running"
    if files.log.exists():  # a log whose header is damaged cannot be resumed: it starts again (backed up first)
        return "interrupted" if files.ckpt.exists() and header is not None else "broken"
    return "broken" if files.ckpt.exists() else "todo"


def _seed1_best(plan: Plan, runs_dir: Path) -> dict[str, Optional[float]]:
    out = {}
    for a in plan.arms:
        _, _, final = _read_log(runs_dir, plan.run_name(a.name, 1))
        out[a.name] = float(final["best_valid_ppl"]) if final else None
    return out


def _complete_runs(plan: Plan, runs_dir: Path, problems: Optional[list[str]] = None) -> list:
    """The plan's runs with a final line (``paper_figures.logs.Run``); a run still
    going or interrupted would cut the seed-mean curves short."""
    from paper_figures.logs import read_runs

    mine = re.compile("|".join(re.escape(plan.run_name(a.name, 0)[:-1]) + r"\d+" for a in plan.arms))
    # the plan's own run names only: "cpu-ptb-" also begins cpu-ptb-cuda's runs and other plans' arms
    return [r for r in read_runs(runs_dir, [] if problems is None else problems)
            if isinstance(r.header.get("run_name"), str) and mine.fullmatch(r.header["run_name"])
            and r.final is not None]


def _claims_wants(plan: Plan, runs_dir: Path) -> tuple[set[str], dict[str, int]]:
    """``(close, targets)`` from the claims (``paper_figures.claims.judge``):
    the plan's arms in a comparison whose difference is within the noise
    rule's margin (``needs_seeds``), and arm -> the seeds that give compared
    arms equal seed counts or that a judgement still lacks (``seed_targets``)."""
    from paper_figures.claims import collect, judge

    if plan.judge != "table1":  # every arm of a Table 2 plan is key: it runs --seeds seeds
        return set(), {}
    runs = _complete_runs(plan, runs_dir) if runs_dir.is_dir() else []
    claims = judge(collect(runs), "")
    cut = len(plan.name) + 1
    targets: dict[str, int] = {}
    for c in claims:
        for k, n in c["seed_targets"].items():
            targets[k[cut:]] = max(targets.get(k[cut:], 0), n)
    return {k[cut:] for c in claims for k in c["needs_seeds"]}, targets


def close_arms(plan: Plan, runs_dir: Path) -> set[str]:
    """The plan's arms in a comparison of the claims whose difference is within
    the noise rule's margin (``paper_figures.claims``: ``needs_seeds``)."""
    return _claims_wants(plan, runs_dir)[0]


def _logged_seeds(plan: Plan, arm: str, runs_dir: Path) -> list[int]:
    """The seeds of ``arm`` that have a log under ``runs_dir``."""
    prefix = plan.run_name(arm, 0).removesuffix("0")  # "<plan>-<arm>-s"
    pat = re.compile(re.escape(prefix) + r"(\d+)\.jsonl")
    return [int(m.group(1)) for p in runs_dir.glob("*.jsonl") if (m := pat.fullmatch(p.name))]


def plan_jobs(plan: Plan, runs_dir: Path, seeds: int, patterns: Optional[list[str]] = None) -> list[RunJob]:
    """Every run of the plan, in order, with its state.  Key arms run ``seeds``
    seeds; so do a ``best_of`` group's winner, once it is known, and the arms of
    close comparisons (``close_arms``), once both sides have a complete run.
    Arms of a comparison run as many seeds as the other side has, and a
    comparison whose arms share no judged seed gets the seed it lacks
    (``_claims_wants``).  A seed that has a log stays listed, so an
    interrupted one resumes."""
    best = _seed1_best(plan, runs_dir)
    winners = {g: best_member(g, best) for g in plan.best_of}
    close, targets = _claims_wants(plan, runs_dir)
    jobs = []
    for a in plan.arms:
        if patterns and not any(fnmatch.fnmatchcase(a.name, p) for p in patterns):
            continue
        n = seeds if (a.key or a.name in close or any(w == a.name for w in winners.values())) else 1
        n = max([n, targets.get(a.name, 0), *_logged_seeds(plan, a.name, runs_dir)])
        for seed in range(1, n + 1):
            name = plan.run_name(a.name, seed)
            jobs.append(RunJob(a.name, seed, name, run_state(runs_dir, name)))
    return jobs


def _command(plan: Plan, job: RunJob, runs_dir: Path, data: Optional[str], threads: Optional[int] = None) -> list[str]:
    over = plan.overrides(job.arm, job.seed)
    if threads is not None:
        over["threads"] = threads
    cmd = [sys.executable, "-m", "dropcheck", "train", "--config", plan.config, "--out", str(runs_dir),
           "--no-progress"]
    if PLANS.get(plan.name) == plan:  # a registered plan's arm: its log header records the plan, arm and claim
        cmd += ["--arm", f"{plan.name}:{job.arm}"]
    if data:
        cmd += ["--data", data]
    if job.state == "interrupted":
        cmd.append("--resume")
    elif job.state == "broken":
        cmd.append("--overwrite")
    cmd += [f"{k}={v}" for k, v in over.items()]
    return cmd


def _progress_line(runs_dir: Path, name: str) -> str:
    _, evals, _ = _read_log(runs_dir, name)
    if not evals:
        return f"{name}: starting"
    e = evals[-1]
    line = f"{name}: epoch {e.get('epoch', 0):.1f} valid {e.get('valid_ppl', math.nan):.1f}"
    if e.get("epoch") and e.get("wall_time"):  # training time so far, resumes included
        line += f", {e['wall_time'] / 60 / e['epoch']:.1f} min/epoch"
    return line


def _job_threads(plan: Plan, job: RunJob, threads: Optional[int]) -> int:
    """The threads one run gets: ``threads`` (``--threads``) or else its
    config's ``threads`` (1 for cpu-ptb; 0: torch's default)."""
    if threads is not None:
        return threads
    from ..pipeline.configs import get_config

    return get_config(plan.config, plan.overrides(job.arm, job.seed))[1]["threads"]


def _launch(plan: Plan, job: RunJob, runs_dir: Path, data: Optional[str], threads: Optional[int] = None):
    """Start one run as a ``dropcheck train`` process on ``_job_threads``
    threads (its config's ``threads`` and the BLAS/OpenMP pools; for 0 the
    pools keep the environment's size), its output appended to ``<run>.out``;
    returns ``(process, job, output file)``."""
    files = run_files(runs_dir, job.name)
    out = open_append(files.out)
    if job.state == "broken" and files.log.exists():  # started again with --overwrite: keep what it had
        backup = files.log.with_name(f"{files.log.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(files.log, backup)
        out.write(f"dropcheck reproduce: {files.log.name} had no checkpoint to resume or a damaged header; "
                  f"moved to {backup.name}, the run starts again\n")
        out.flush()
    n = _job_threads(plan, job, threads)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)} if n else {})}
    p = subprocess.Popen(_command(plan, job, runs_dir, data, threads), stdout=out, stderr=subprocess.STDOUT, env=env)
    return p, job, out


def _finished(runs_dir: Path, name: str, rc: int) -> tuple[bool, str]:
    """Whether a finished process left a complete log, and the line that says so
    (with the tail of its output when it did not)."""
    _, _, final = _read_log(runs_dir, name)  # a final line: run_state's "done"
    if rc != 0 or final is None:
        tail = run_files(runs_dir, name).out.read_text(errors="replace").splitlines()[-8:]
        return False, f"FAILED {name} (exit {rc}):\n    " + "\n    ".join(tail)
    return True, (f"done   {name}: best valid {final['best_valid_ppl']:.2f} at step "
                  f"{final['best_step']}, test {final['test_ppl']:.2f}")


def _held_elsewhere(runs_dir: Path, name: str) -> bool:
    """Whether a run our process could not start is another process's (another
    driver took its lock between our look and our start)."""
    files = run_files(runs_dir, name)
    if is_locked(files.lock):
        return True
    tail = files.out.read_text(errors="replace").splitlines()[-3:] if files.out.exists() else []
    return any("already running in another process" in line for line in tail)


class PlanOutcome(NamedTuple):
    failed: list[str]  # runs whose process ended without a complete log
    left: list[str]  # runs not done when the time limit was reached (the same command resumes them)


def run_plan(plan: Plan, runs_dir: Path, *, jobs: int = 2, seeds: int = 2, data: Optional[str] = None,
             patterns: Optional[list[str]] = None, progress: bool = True, poll: float = 1.0,
             time_limit: Optional[float] = None, threads: Optional[int] = None) -> PlanOutcome:
    """Runs every unfinished run (re-planning after each finish, so a
    ``best_of`` winner's extra seeds join in), each on ``threads`` threads
    (default: the config's).  After ``time_limit`` seconds it stops the
    running jobs (each checkpoints at its next step) and starts no more."""
    from tqdm import tqdm

    runs_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    left: list[str] = []
    held: list[str] = []  # runs another process took between our look and our start: left to it
    running: dict[str, tuple[subprocess.Popen, RunJob, object]] = {}
    deadline = None if time_limit is None else time.monotonic() + time_limit
    total0 = len([j for j in plan_jobs(plan, runs_dir, seeds, patterns) if j.state != "done"])
    bar = tqdm(total=total0, desc=f"{plan.name}", unit="run", file=sys.stderr, dynamic_ncols=True,
               disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 60.0)
    done_count = 0

    def stop_all(signum=None, frame=None):
        """SIGTERM to every job (``dropcheck train`` checkpoints at its next
        step and exits), SIGKILL to one that has not exited after ``_STOP_WAIT`` s."""
        for p, _, _ in running.values():
            if p.poll() is None:
                p.terminate()
        for p, _, out in running.values():
            try:
                p.wait(timeout=_STOP_WAIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out.close()
        if signum is not None:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop_all)
    try:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                stop_all()
                for name in sorted(running):
                    bar.write(f"stopped {_progress_line(runs_dir, name)} ({run_state(runs_dir, name)})")
                left = [j.name for j in plan_jobs(plan, runs_dir, seeds, patterns)
                        if j.state != "done" and j.name not in failed]
                break
            todo = [j for j in plan_jobs(plan, runs_dir, seeds, patterns)
                    if j.state not in ("done", "running") and j.name not in running and j.name not in failed
                    and j.name not in held]
            started = todo[: max(0, jobs - len(running))]
            for job in started:
                running[job.name] = _launch(plan, job, runs_dir, data, threads)
                bar.write(f"start  {job.name} ({job.state})")
            # runs known so far (a best_of winner's extra seeds join once the group has finished)
            bar.total = done_count + len(running) + len(todo) - len(started)
            if not running:
                break
            time.sleep(poll)
            for name, (p, job, out) in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                out.close()
                del running[name]
                done_count += 1
                ok, line = _finished(runs_dir, name, rc)
                if not ok and _held_elsewhere(runs_dir, name):
                    ok, line = True, f"held   {name}: another process is running it; left to that process"
                    held.append(name)
                if not ok:
                    failed.append(name)
                bar.write(line)
                bar.update(1)
            bar.set_postfix_str(" | ".join(_progress_line(runs_dir, n) for n in running), refresh=False)
    except KeyboardInterrupt:
        stop_all()
        bar.write("interrupted: running jobs were stopped; run the same command again to resume them")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        bar.close()
    return PlanOutcome(failed, left)


def _drawing_code() -> str:
    """A digest of the code that draws (``paper_figures/`` and ``training/``,
    which holds the plans).  A driver that ran for hours holds the code it
    loaded when it started: if these files changed meanwhile, ``run`` draws in
    a new process, so that the results always come from the code on disk."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("paper_figures", "training"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _check_seeds_agree(runs: list) -> None:
    """The claims pool the seeds of an arm (its run name less ``-s<seed>``):
    a ``DropcheckError`` if two of them differ in a config key other than the
    seed and the bookkeeping ones (``paper_figures.logs.config_key``)."""
    import json

    from paper_figures.logs import config_key

    arms: dict = {}
    for r in runs:
        arms.setdefault(r.arm_key, []).append(r)
    for arm, members in sorted(arms.items()):
        cfgs = {config_key(m): m for m in members}
        if len(cfgs) > 1:
            (ka, a), (kb, b) = list(cfgs.items())[:2]
            ca, cb = json.loads(ka), json.loads(kb)
            keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
            raise DropcheckError(f"the seeds of {arm} differ in {', '.join(keys)} ({a.path.name} vs {b.path.name}): "
                                 "they are not seeds of one arm; move one aside or give it another run name")


def draw(plan: Plan, runs_dir: Path, out: Path) -> list[Path]:
    """Figures, tables and the claims (JSON + Markdown) from the logs alone."""
    from paper_figures.claims import write_claims
    from paper_figures.figures import FIGURES, draw as draw_figure
    from paper_figures.summary import draw_summary
    from paper_figures.tables import table1

    problems: list[str] = []
    runs = _complete_runs(plan, runs_dir, problems)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not runs:
        raise DropcheckError(f"no run log of plan {plan.name!r} under {runs_dir}")
    _check_seeds_agree(runs)
    out.mkdir(parents=True, exist_ok=True)
    if plan.judge == "table2":
        from paper_figures.table2 import write_table2

        return write_table2(runs, out, plan_name=plan.name)
    written: list[Path] = []
    per_claim = {}  # claim id -> its figure's PNG, shown beside the verdict in CLAIMS.md
    for name, (_, claim, _) in FIGURES.items():
        drawn = draw_figure(name, runs, out)
        written += drawn
        if drawn:
            per_claim[claim] = drawn[0].name
    written += table1(runs, out)
    summary = draw_summary(runs, out, plan_name=plan.name)
    written += summary
    written += write_claims(runs, out, plan_name=plan.name, figure=summary[0].name if summary else None,
                            figures=per_claim)
    return written


def print_status(plan: Plan, runs_dir: Path, seeds: int, patterns) -> None:
    """One line per run (state, best valid or progress), then an estimate of the
    training left: a run not done is expected to take as long as the mean of
    its arm's complete seeds, less the training time it has logged.  These are
    wall minutes as those seeds ran (their machine, their thread count), not
    a per-core figure: seeds logged by slower code or machines overstate it."""
    jobs = plan_jobs(plan, runs_dir, seeds, patterns)
    logs = {j.name: _read_log(runs_dir, j.name) for j in jobs}
    took: dict[str, list[float]] = {}  # arm -> minutes of its complete seeds
    for j in jobs:
        if j.state == "done":
            took.setdefault(j.arm, []).append(logs[j.name][2]["wall_time"] / 60)
    left, unknown = 0.0, 0
    for j in jobs:
        _, evals, final = logs[j.name]
        extra = ""
        if j.state == "done":
            extra = f"best valid {final['best_valid_ppl']:.2f}, {final['wall_time'] / 60:.1f} min"
        elif j.state in ("running", "interrupted", "broken"):
            extra = _progress_line(runs_dir, j.name)
        if j.state != "done":
            if j.arm in took:
                mean = sum(took[j.arm]) / len(took[j.arm])
                so_far = evals[-1].get("wall_time", 0.0) / 60 if evals and j.state != "broken" else 0.0
                left += max(mean - so_far, 0.0)
                extra += f"{'; ' if extra else ''}its arm's complete seeds took {mean:.0f} min"
            else:
                unknown += 1
        print(f"{j.state:12s} {j.name:45s} {extra}")
    if left or unknown:
        print(f"(training left: about {left:.0f} min of wall time, as the same arms' complete seeds ran"
              + (f"; {unknown} run(s) of arms with no complete seed yet" if unknown else "") + ")")
    pend = [g for g in plan.best_of if best_member(g, _seed1_best(plan, runs_dir)) is None]
    for g in pend:
        print(f"(best of {', '.join(g)}: extra seeds once all have seed 1)")
    close, targets = _claims_wants(plan, runs_dir)
    if close:
        print(f"(close comparisons: {', '.join(sorted(close))} run {seeds} seeds)")
    wanted = [j.name for j in jobs if j.state != "done" and j.seed <= targets.get(j.arm, 0)]
    if wanted:
        print(f"(seeds that equalize compared arms, or that a judgement lacks: {', '.join(wanted)})")


def recheck(plan: Plan, runs_dir: Path, run: str, data: Optional[str], tolerance: float) -> int:
    """Re-run the first epoch of a committed run with its logged config.

    The re-run matches exactly on the machine kind the run was logged on; a
    different processor or kernel instruction set rounds differently, and 300
    steps at lr 20 grow that into a few percent (results/cpu-ptb/README.md,
    "Re-checking a run"), so the machine of both is printed beside the verdict."""
    from ..pipeline.configs import validate
    from ..pipeline.data import load_corpus, resolve_corpus_dir
    from ..pipeline.trainer import cpu_kernels, train

    safe_name(run, "--recheck")
    log = run_files(runs_dir, run).log
    header, evals, _ = _read_log(runs_dir, run)
    if header is None or not evals:
        raise DropcheckError(f"{log}: no header or no evaluation to re-check")
    first = evals[0]
    # the header is someone else's file: every name in it that becomes a path is checked, every key validated
    config_name = safe_name(header.get("config_name", plan.config), f"config_name in the header of {log}")
    if not isinstance(header.get("config"), dict) or not isinstance(first.get("step"), int) or first["step"] < 1:
        raise DropcheckError(f"{log}: the header's config or the first evaluation's step is malformed")
    from ..pipeline.configs import DEFAULTS

    try:
        # keys added since the run was logged take their defaults, which compute what the code did before them
        cfg = validate({**DEFAULTS, **header["config"], "max_steps": first["step"], "progress": False})
    except DropcheckError as exc:
        raise DropcheckError(f"{log}: the header's config is invalid: {exc}") from None
    corpus = load_corpus(resolve_corpus_dir(data, cfg["corpus"]))
    logged = header.get("corpus")
    if isinstance(logged, dict) and logged != corpus.identity(cfg["corpus"]):
        raise DropcheckError(f"{log} was trained on another corpus than {corpus.path} (its header records "
                             f"{logged.get('name')!r}, vocabulary {logged.get('vocab_size')}, with other file "
                             "checksums or vocabulary): pass that corpus with --data")
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, data=data, out=tmp, config_name=config_name, corpus=corpus)
    got = res.records[0]["valid_ppl"]
    want = first["valid_ppl"]
    rel = abs(got - want) / want
    ok = rel <= tolerance
    print(f"{run}: first evaluation at step {first['step']}: logged valid ppl {want:.4f}, re-run {got:.4f} "
          f"(relative difference {rel:.2e}, tolerance {tolerance:g}): {'ok' if ok else 'MISMATCH'}")
    here = cpu_kernels()
    there = {k: header.get(k) for k in here}
    print(f"  logged on: {_machine(there)}\n  re-run on: {_machine(here)}")
    if not ok and there != here:
        print("  the machines differ (or the log does not say): float rounding differs between processors and "
              "kernel instruction sets, and the first epoch grows it; re-check on the logged machine kind")
    return 0 if ok else 1


def _machine(m: Mapping[str, Optional[str]]) -> str:
    if not m.get("cpu"):
        return "not recorded (logs before the header kept the processor)"
    return f"{m['cpu']}, {m['cpu_capability']} kernels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, choices=sorted(PLANS), help="the study plan")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: the config's, 1 for cpu-ptb); e.g. --jobs 1 --threads 2 "
                        "puts both cores of a 2-core machine on one long run")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the key arms and of the best R_approx coefficient (default 2)")
    p.add_argument("--arms", nargs="+", metavar="PATTERN", help="run only arms matching these glob patterns")
    p.add_argument("--runs", default=None, help="folder of the run logs (default results/runs/<plan>)")
    p.add_argument("--out", default=None, help="folder of figures and claims (default results/<plan>)")
    p.add_argument("--data", default=None, help="corpus folder (default: $DROPCHECK_DATA)")
    p.add_argument("--status", action="store_true", help="show every run's state, then exit")
    p.add_argument("--draw-only", action="store_true", help="draw from the logs there are, run nothing")
    p.add_argument("--recheck", metavar="RUN", help="re-run the first epoch of RUN and compare its validation perplexity")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance of --recheck (default 0.01)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="after this many minutes stop the running jobs (each checkpoints first), draw, and exit 75")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    plan = get_plan(args.plan)
    if args.jobs < 1:
        raise DropcheckError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds < 1:
        raise DropcheckError(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        raise DropcheckError(f"--threads must be >= 1, got {args.threads}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise DropcheckError(f"--time-limit must be > 0 minutes, got {args.time_limit}")
    runs_dir = Path(args.runs or f"results/runs/{plan.name}")
    out = Path(args.out or f"results/{plan.name}")
    unmatched = [p for p in args.arms or [] if not any(fnmatch.fnmatchcase(a.name, p) for a in plan.arms)]
    if unmatched:
        raise DropcheckError(f"--arms {' '.join(unmatched)} matches no arm of plan {plan.name!r}; its arms: "
                             + ", ".join(a.name for a in plan.arms))
    if args.recheck:
        return recheck(plan, runs_dir, args.recheck, args.data, args.tolerance)
    if args.status:
        print_status(plan, runs_dir, args.seeds, args.arms)
        return 0
    outcome, busy = PlanOutcome([], []), []
    code = None if args.draw_only else _drawing_code()  # only a driver that runs can outlive its code
    if not args.draw_only:
        pending = [j for j in plan_jobs(plan, runs_dir, args.seeds, args.arms) if j.state != "done"]
        busy = [j.name for j in pending if j.state == "running"]
        if busy:
            print(f"{plan.name}: left to the process running them: {', '.join(busy)}", file=sys.stderr)
        pending = [j for j in pending if j.state != "running"]
        if pending:
            n = _job_threads(plan, pending[0], args.threads)
            print(f"{plan.name}: {len(pending)} run(s) to do, {args.jobs} at a time, "
                  + (f"{n} thread(s) each" if n else "torch's default threads each"), file=sys.stderr)
            try:
                outcome = run_plan(plan, runs_dir, jobs=args.jobs, seeds=args.seeds, data=args.data,
                                   patterns=args.arms, progress=not args.no_progress,
                                   time_limit=None if args.time_limit is None else args.time_limit * 60,
                                   threads=args.threads)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: run_plan stopped the jobs and said how to resume
                return 130
        elif not busy:
            print(f"{plan.name}: every run is done; drawing only", file=sys.stderr)
    if (outcome.left or busy) and not _complete_runs(plan, runs_dir):
        print(f"{plan.name}: no complete run yet, nothing to draw", file=sys.stderr)
    elif code is not None and _drawing_code() != code:
        print(f"{plan.name}: the code under paper_figures/ or training/ changed while the runs went on; "
              "drawing in a new process with the code as it is now", file=sys.stderr)
        cmd = [sys.executable, "-m", "dropcheck", "reproduce", "--plan", plan.name, "--draw-only",
               "--runs", str(runs_dir), "--out", str(out)]
        if subprocess.run(cmd).returncode != 0:
            print(f"{plan.name}: drawing failed: run `dropcheck reproduce --plan {plan.name} --draw-only`",
                  file=sys.stderr)
            return 1
    else:
        written = draw(plan, runs_dir, out)
        print(f"wrote {len(written)} files under {out}")
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return 1
    if outcome.left:
        print(f"time limit reached: {len(outcome.left)} run(s) left ({', '.join(outcome.left)}); run the same "
              "command again to continue", file=sys.stderr)
        return 75
    return 0
