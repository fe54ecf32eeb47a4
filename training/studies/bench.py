"""``dropcheck bench``: time every update rule side by side, in one process.

    dropcheck bench [--config NAME_OR_FILE] [--device cpu|cuda] [--warmup N]
                    [--repeats N] [--arms LABEL,...] [--vocab V] [--out FILE]
                    [key=value ...]

Each *arm* is one update rule with its estimators and LSTM backend (``ARMS``);
each is timed on the step the trainer runs (``trainer.Trainer.step``: the
rule's objective and one ``backward()``, its noise added to ``.grad``,
clipping, the SGD step) with the model size, batch and BPTT length of the
config (``--config``: any named config or JSON file of ``dropcheck train``;
default ``smoke``, a small CPU size; ``--config ptb`` is the paper's
AWD-LSTM, meant for a GPU).  The tokens are random over ``--vocab`` words
(10,000 by default, PTB's), since the cost of a step does not depend on
them, so no corpus is needed.

Execution mode, the same for every arm: eager PyTorch, the config's dtype
(float32 by default), the same thread count, no ``torch.compile``, no AMP,
fixed BPTT length, ``torch.backends.cudnn`` and TF32 left at torch's
defaults (recorded in the JSON).  Backends: ``fused`` is one
``torch._VF.lstm`` call per layer (cuDNN on CUDA, ATen's CPU kernel on CPU);
``loop`` the Python-loop LSTM.  The rules that differentiate through a
gradient (sampled-label explicit term, autograd ξ_approx) run on the loop
LSTM on every device, because cuDNN has no double backward; the dropout
step is timed on both backends so that the loop's own cost is visible.

Protocol: every arm's model, optimizer and hidden state are built first;
each arm runs ``--warmup`` steps; then ``--repeats`` rounds, each timing one
step of every arm in turn (interleaved, so that drifting load on a shared
machine affects all arms alike); then one more, untimed step per arm
measures its peak memory (kept out of the timed steps so that the
measurement cannot change the timings).  A step's time is wall-clock, with
``torch.cuda.synchronize()`` before and after on CUDA.  Reported per arm:
median and interquartile range (IQR = q75 - q25) of ms/step, tokens/s at
the median, the ratio of its median to the baseline's (``dropout`` k=1 on
the fused backend), and peak memory of a step above what was allocated
before it (what every arm keeps resident is not counted):

- CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus
  ``torch.cuda.memory_allocated()`` just before it;
- CPU: peak resident set size during the step minus the resident set size
  just before it (Linux: ``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, and ``VmRSS``; glibc's ``malloc_trim(0)``
  first, so that memory cached by the allocator from earlier steps is
  given back and counted again).  It counts touched pages, so it is an
  upper-bound-ish measure of the step's working memory, not of tensor
  bytes; where ``/proc`` cannot be used it is reported as null.

The JSON (``--out``; default ``results/bench/<device>-<config>.json``) holds
the device and its name, torch and CUDA versions, thread count, the config,
the git commit and every step time of every arm.  A CPU result is labelled
``"device_type": "cpu"``: it says nothing about the GPU ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from dropcheck import DropcheckError

from .arm import Arm
from ..pipeline.files import atomic_write_text

SCHEMA = "dropcheck-bench/1"
DEFAULT_CONFIG = "smoke"
BASELINE = "dropout"


ARMS: tuple[Arm, ...] = (
    Arm("dropout", {"rule": "dropout", "k": 1}, backend="fused", what="DROPOUT_1 (baseline)"),
    Arm("dropout-loop", {"rule": "dropout", "k": 1}, backend="loop", what="DROPOUT_1 on the loop LSTM"),
    Arm("none", {"rule": "none"}, backend="fused", what="no dropout"),
    Arm("explicit-sampled", {"rule": "explicit", "estimator": "sampled"}, backend="loop",
        what="L + R_approx, sampled labels, double backward"),
    Arm("explicit-fd", {"rule": "explicit", "estimator": "fd"}, backend="fused",
        what="L + R_approx, finite differences (clean pass + the estimator's 3 passes)"),
    Arm("explicit-fd_shared", {"rule": "explicit", "estimator": "fd_shared"}, backend="fused",
        what="L + R_approx through the Algorithm 2 surrogate with noise weight 0 (3 forward passes, 1 backward)"),
    Arm("explicit-fd_mid", {"rule": "explicit", "estimator": "fd_mid"}, backend="fused",
        what="L + R_approx, no clean pass: L and p at the probe passes' midpoint (2 forward passes, 1 backward)"),
    Arm("explicit_implicit-autograd", {"rule": "explicit_implicit", "estimator": "sampled",
                                       "noise_estimator": "autograd"}, backend="loop",
        what="Algorithm 2: sampled R_approx + autograd xi_approx, double backward"),
    Arm("explicit_implicit-fd", {"rule": "explicit_implicit", "estimator": "fd", "noise_estimator": "fd"},
        backend="fused",
        what="Algorithm 2: fd R_approx + fd xi_approx (5 forward passes, 3 backward)"),
    Arm("explicit_implicit-fd_shared", {"rule": "explicit_implicit", "estimator": "fd_shared"}, backend="fused",
        what="Algorithm 2: one shared probe (3 forward passes, 1 backward)"),
    Arm("explicit_implicit-fd_mid", {"rule": "explicit_implicit", "estimator": "fd_mid"}, backend="fused",
        what="Algorithm 2: one shared probe, no clean pass (2 forward passes, 1 backward)"),
    Arm("dropout-k4", {"rule": "dropout", "k": 4}, backend="fused", what="DROPOUT_4 (Algorithm 1)"),
    Arm("dropout_inject-k4", {"rule": "dropout_inject", "k": 4}, backend="fused",
        what="DROPOUT_4 + ξ̃_drop (two more dropout draws for the injected noise)"),
    Arm("dropout_implicit-k4", {"rule": "dropout_implicit", "k": 4, "noise_estimator": "fd"}, backend="fused",
        what="DROPOUT_4 + ξ_approx (Algorithm 4), fd noise"),
    Arm("dropout_implicit-k4-fd_shared", {"rule": "dropout_implicit", "k": 4, "estimator": "fd_shared"},
        backend="fused",
        what="DROPOUT_4 + ξ_approx, the noise as the shared-probe objective's term (3 more forward passes, one backward)"),
    Arm("dropout_implicit-k4-fd_mid", {"rule": "dropout_implicit", "k": 4, "estimator": "fd_mid"}, backend="fused",
        what="DROPOUT_4 + ξ_approx, the shared-probe noise term without its clean pass (2 more forward passes)"),
    Arm("identity-fd", {"rule": "identity_hessian", "estimator": "fd"}, backend="fused",
        what="L + R_approx with H_out -> I/c, finite differences"),
    Arm("identity-fd_shared", {"rule": "identity_hessian", "estimator": "fd_shared"}, backend="fused",
        what="L + R_approx with H_out -> I/c through the surrogate (3 forward passes, 1 backward)"),
    Arm("loss_jacobian", {"rule": "loss_jacobian"}, backend="loop",
        what="L + R̃_approx (5.1): the loss gradient in every site, double backward through the loop LSTM"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help=f"named config or JSON file of `dropcheck train` (default: {DEFAULT_CONFIG}; ptb: the paper's size)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default: cpu)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first (default: 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per arm (default: 10)")
    parser.add_argument("--arms", default=None,
                        help="comma-separated arm labels to time (default: all; the baseline is always included)")
    parser.add_argument("--vocab", type=int, default=10_000, help="vocabulary size (default: 10000, PTB's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the config's 'threads', else torch's default)")
    parser.add_argument("--out", default=None, help="JSON file (default: results/bench/<device>-<config>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the arms, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (model size, bptt, ...)")


# --------------------------------------------------------------------------
# memory


class _CpuPeak:
    """Peak RSS of a step above the RSS before it (Linux /proc; else None)."""

    def __init__(self):
        self.ok = os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        if self.ok:
            try:
                self.start()
            except OSError:
                self.ok = False

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(f"no {key} in /proc/self/status")

    def start(self) -> None:
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.base = self._status_kib("VmRSS")

    def stop(self) -> Optional[int]:
        return (self._status_kib("VmHWM") - self.base) * 1024


# --------------------------------------------------------------------------
# the bench


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _select_arms(spec: Optional[str]) -> list[Arm]:
    if not spec:
        return list(ARMS)
    by = {a.name: a for a in ARMS}
    want = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in want if w not in by]
    if unknown:
        raise DropcheckError(f"--arms: unknown arm(s) {unknown}; expected some of {list(by)}")
    if BASELINE not in want:
        want.insert(0, BASELINE)
    return [by[w] for w in dict.fromkeys(want)]


@dataclass
class _ArmRun:
    """One arm's trainer, hidden state and measurements during the bench."""

    arm: Arm
    cfg: dict
    trainer: Any = None
    hidden: Any = None
    batches: int = 0
    ms: list = field(default_factory=list)
    mem: Optional[int] = None
    error: Optional[str] = None

    def fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"[:1000]


def _model_text(cfg: dict) -> str:
    """The model's size in the table's title, in its architecture's terms."""
    arch = cfg.get("arch", "awd-lstm")
    if arch == "awd-lstm":
        return f"emb {cfg['emb']}, {cfg['layers']} x {cfg['hidden']}"
    return f"{arch}: emb {cfg['emb']}, {cfg['layers']} layers, {cfg.get('heads', '?')} heads"


def arms_for(arch: str, chosen: list[Arm]) -> list[Arm]:
    """The arms that mean something on ``arch``: an architecture without the
    LSTM's ``backend`` key runs each rule once (its arms without a backend;
    the ``-loop`` variants, which differ from another arm by the backend
    alone, are dropped)."""
    from ..pipeline.lm import get_arch

    if "backend" in get_arch(arch).keys:
        return chosen
    seen, out = set(), []
    for a in chosen:
        key = tuple(sorted(a.overrides.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(replace(a, backend="n/a"))
    return out


def _build_arms(chosen: list[Arm], base: dict, vocab: int, dev, dtype) -> list[_ArmRun]:
    """Every arm's model, trainer and hidden state, before any step runs; an
    arm that cannot be built (e.g. multipliers fd_shared cannot share) keeps
    its error and is reported."""
    from ..pipeline import configs
    from ..pipeline.trainer import Trainer, build_lm

    runs = []
    for arm in arms_for(base["arch"], chosen):
        backend = {} if arm.backend == "n/a" else {"backend": arm.backend}
        run = _ArmRun(arm, configs.validate({**base, **arm.overrides, **backend}))
        runs.append(run)
        try:
            lm = build_lm(run.cfg, vocab, dev, dtype, arm.backend)
            run.trainer = Trainer(run.cfg, lm, device=dev)  # the training run's step, without data or log
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and the table
            run.fail(exc)
            continue
        run.hidden = lm.init_state(base["batch_size"])
        run.trainer.model.train()
    return runs


class _Stepper:
    """One ``Trainer.step`` of an arm on the next batch of the pool, in one of
    three modes: "warmup" (untimed), "time" (appends ms) or "memory"
    (untimed; peak memory above what was allocated before the step).  An arm
    that fails (out of memory, diverged) keeps its error and is skipped from
    then on; the other arms go on."""

    def __init__(self, pool: list, dev):
        import torch

        self.torch, self.pool, self.dev = torch, pool, dev
        self.cpu_peak = _CpuPeak() if dev.type == "cpu" else None

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def _start_memory(self) -> Optional[int]:
        cuda = self.torch.cuda
        if self.dev.type == "cuda":
            before = cuda.memory_allocated(self.dev)
            cuda.reset_peak_memory_stats(self.dev)
            return before
        if self.cpu_peak is not None and self.cpu_peak.ok:
            self.cpu_peak.start()
        return None

    def _stop_memory(self, before: Optional[int]) -> Optional[int]:
        if self.dev.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.dev) - before
        if self.cpu_peak is not None and self.cpu_peak.ok:
            return self.cpu_peak.stop()
        return None

    def _step(self, run: _ArmRun, mode: str) -> None:
        batch = self.pool[run.batches % len(self.pool)]
        run.batches += 1
        x, y = batch[:-1], batch[1:]
        self._sync()
        before = self._start_memory() if mode == "memory" else None
        t0 = time.perf_counter()
        _loss, _reg, run.hidden = run.trainer.step(x, y, run.hidden)
        self._sync()
        dt = time.perf_counter() - t0
        if mode == "time":
            run.ms.append(1e3 * dt)
        elif mode == "memory":
            run.mem = self._stop_memory(before)

    def __call__(self, run: _ArmRun, mode: str) -> None:
        if run.error is not None:
            return
        try:
            self._step(run, mode)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and the table
            run.fail(exc)
            run.trainer.model.hidden = None
            run.hidden = None
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()

    def memory_metric(self) -> str:
        if self.dev.type == "cuda":
            return ("torch.cuda.max_memory_allocated() during one extra untimed step after the timed rounds "
                    "minus memory_allocated() before it")
        if self.cpu_peak is not None and self.cpu_peak.ok:
            return ("peak RSS during one extra untimed step after the timed rounds minus RSS before it "
                    "(Linux VmHWM reset via /proc/self/clear_refs, VmRSS; glibc malloc_trim(0) first)")
        return "unavailable (no /proc/self/clear_refs)"


def _run_protocol(runs: list[_ArmRun], step: _Stepper, warmup: int, repeats: int, bar) -> float:
    """Warm-up per arm, then interleaved timed rounds, then one memory step
    per arm (module docstring); returns the wall time in seconds."""

    def tick(text: Optional[str] = None) -> None:
        if bar is not None:
            if text is not None:
                bar.set_postfix_str(text)
            else:
                bar.update(1)

    t_start = time.perf_counter()
    for run in runs:
        tick(f"warm-up {run.arm.name}")
        for _ in range(warmup):
            step(run, "warmup")
            tick()
    for r in range(repeats):
        tick(f"round {r + 1}/{repeats}")
        for run in runs:
            step(run, "time")
            tick()
    tick("memory")
    for run in runs:
        step(run, "memory")
        tick()
    return time.perf_counter() - t_start


def _arm_record(run: _ArmRun, base_med: Optional[float], dev, tokens_per_step: int) -> dict:
    """One arm's entry of the JSON."""
    import torch

    from ..pipeline.rules import rule_class

    arm, cfg = run.arm, run.cfg
    rule = rule_class(cfg["rule"])
    if arm.backend == "n/a":
        impl = cfg["arch"]
    elif arm.backend == "fused":
        impl = "cuDNN" if (dev.type == "cuda" and torch.backends.cudnn.enabled) else f"ATen LSTM ({dev.type})"
    else:
        impl = "Python-loop LSTM"
    q25, med, q75 = _quantiles(run.ms) if run.ms and run.error is None else (None, None, None)
    ok = med is not None
    params = run.trainer.params if run.trainer is not None else []
    return {
        "label": arm.name,
        "what": arm.what,
        "rule": cfg["rule"],
        "k": cfg["k"],
        "estimator": cfg["estimator"] if rule.uses_estimator(cfg) else None,
        "noise_estimator": cfg["noise_estimator"] if rule.uses_noise_estimator(cfg) else None,
        "backend": arm.backend,
        "backend_impl": impl,
        "double_backward": rule.needs_double_backward(cfg),
        "error": run.error,
        "ms": run.ms,
        "median_ms": med,
        "q25_ms": q25,
        "q75_ms": q75,
        "iqr_ms": q75 - q25 if ok else None,
        "mean_ms": statistics.fmean(run.ms) if ok else None,
        "min_ms": min(run.ms) if ok else None,
        "tokens_per_s": (tokens_per_step / (med / 1e3) if med > 0 else math.inf) if ok else None,
        "ratio_to_baseline": med / base_med if (ok and base_med) else None,
        "peak_mem_bytes": run.mem,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def _environment(dev) -> dict:
    """Device, versions and numerics settings of the JSON."""
    import torch

    import dropcheck

    from ..pipeline.trainer import device_name

    return {
        "device_type": dev.type,
        "device": str(dev),
        "device_name": device_name(dev),
        "label": ("CPU timing (not a GPU result)" if dev.type == "cpu" else "GPU timing"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        } if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "dropcheck": dropcheck.__version__,
        "threads": torch.get_num_threads(),
    }


def bench(
    config: str = DEFAULT_CONFIG,
    overrides=(),
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    arms: Optional[str] = None,
    vocab: int = 10_000,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Run the bench; returns the JSON-ready result (module docstring)."""
    import torch

    from ..pipeline import configs
    from ..pipeline.trainer import git_commit, stream_seed

    if warmup < 0 or repeats < 1:
        raise DropcheckError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    if vocab < 2:
        raise DropcheckError(f"--vocab must be >= 2, got {vocab}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    name, base = configs.get_config(config, list(overrides))
    if device == "cuda" and not torch.cuda.is_available():
        raise DropcheckError("--device cuda requested but CUDA is not available")
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    nthreads = threads if threads is not None else (base["threads"] or None)
    if nthreads:
        torch.set_num_threads(int(nthreads))
    dtype = {"float32": torch.float32, "float64": torch.float64}[base["dtype"]]
    T, B = base["bptt"], base["batch_size"]

    runs = _build_arms(_select_arms(arms), base, vocab, dev, dtype)
    gen = torch.Generator().manual_seed(stream_seed(base["seed"], 9))
    step = _Stepper([torch.randint(0, vocab, (T + 1, B), generator=gen).to(dev) for _ in range(4)], dev)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs) * (warmup + repeats + 1), desc=f"bench {name} on {dev.type}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        wall = _run_protocol(runs, step, warmup, repeats, bar)
    finally:
        if bar is not None:
            bar.close()

    base_run = next(r for r in runs if r.arm.name == BASELINE)
    base_med = _quantiles(base_run.ms)[1] if base_run.ms and base_run.error is None else None
    return {
        "schema": SCHEMA,
        **_environment(dev),
        "git_commit": git_commit(),
        "config_name": name,
        "config": base,
        "vocab": vocab,
        "bptt": T,
        "batch_size": B,
        "tokens_per_step": T * B,
        "dtype": base["dtype"],
        "warmup": warmup,
        "repeats": repeats,
        "protocol": ("all arms built first; warm-up steps per arm; then interleaved rounds, one timed step per arm "
                     "per round; then one untimed step per arm for peak memory"),
        "memory_metric": step.memory_metric(),
        "baseline": BASELINE,
        "arms": [_arm_record(r, base_med, dev, T * B) for r in runs],
        "wall_s": wall,
        "started": started,
    }


def _fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return "-"


def format_table(res: dict) -> str:
    head = ("arm", "backend", "ms/step", "IQR", "tokens/s", "peak mem", "x dropout")
    rows = []
    for a in res["arms"]:
        ratio = a["ratio_to_baseline"]
        if a["median_ms"] is None:
            rows.append((a["label"], a["backend_impl"], "error", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                a["label"],
                a["backend_impl"],
                f"{a['median_ms']:.2f}",
                f"{a['iqr_ms']:.2f}",
                f"{a['tokens_per_s']:,.0f}",
                _fmt_bytes(a["peak_mem_bytes"]),
                f"{ratio:.2f}" if ratio is not None else "-",
            )
        )
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = (
        f"{res['label']}: {res['device_name']}, torch {res['torch']}, config {res['config_name']} "
        f"({_model_text(res['config'])}, vocab {res['vocab']}, "
        f"bptt {res['bptt']}, batch {res['batch_size']}, {res['dtype']}, {res['threads']} thread(s)); "
        f"median of {res['repeats']} steps after {res['warmup']} warm-up"
    )
    errors = [f"{a['label']}: {a['error']}" for a in res["arms"] if a["error"]]
    return "\n".join([title, line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows] + errors)


def default_out(res: dict) -> Path:
    return Path("results") / "bench" / f"{res['device_type']}-{res['config_name']}.json"


def run(args: argparse.Namespace) -> int:
    if args.list:
        for a in ARMS:
            over = " ".join(f"{k}={v}" for k, v in a.overrides.items())
            print(f"{a.name:30s} backend={a.backend:5s} {over}  # {a.what}")
        return 0
    res = bench(
        args.config,
        args.overrides,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        arms=args.arms,
        vocab=args.vocab,
        threads=args.threads,
        progress=not args.no_progress,
    )
    out = Path(args.out) if args.out else default_out(res)
    atomic_write_text(out, json.dumps(res, indent=1, allow_nan=True) + "\n")
    print(format_table(res))
    print(f"wrote {out}")
    return 1 if any(a["error"] for a in res["arms"]) else 0


# --------------------------------------------------------------------------
# sweep: how the ratios grow with the vocabulary and the hidden size

SWEEP_ARMS = ("dropout", "explicit-fd", "explicit-fd_shared", "explicit-fd_mid", "explicit_implicit-fd_shared",
              "explicit_implicit-fd_mid")


def sweep(
    config: str = "cpu-ptb",
    overrides=(),
    *,
    vocabs=(1_000, 3_300, 10_000, 33_000),
    hiddens=(100, 200, 400, 800),
    base_vocab: int = 10_000,
    base_hidden: Optional[int] = None,
    arms=SWEEP_ARMS,
    warmup: int = 1,
    repeats: int = 5,
    threads: Optional[int] = 1,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """One ``bench`` per point (each its own side-by-side timing): the
    vocabulary over ``vocabs`` at the config's hidden size, then ``hidden``
    over ``hiddens`` at ``base_vocab`` (``emb`` as in the config).  Returns
    ``{"vocab": [...], "hidden": [...]}`` with each point's ratios to the
    dropout step, medians and peak memory."""
    from ..pipeline import configs

    _, base = configs.get_config(config, list(overrides))
    base_hidden = base["hidden"] if base_hidden is None else base_hidden
    spec = ",".join(arms)
    out: dict = {"schema": "dropcheck-bench-sweep/1", "config_name": config, "arms": list(arms), "warmup": warmup,
                 "repeats": repeats, "base_vocab": base_vocab, "base_hidden": base_hidden, "vocab": [], "hidden": []}
    points = [("vocab", v, base_hidden) for v in vocabs] + [("hidden", base_vocab, h) for h in hiddens]
    for axis, V, H in points:
        res = bench(config, [*overrides, f"hidden={H}"], device=device, warmup=warmup, repeats=repeats, arms=spec, vocab=V,
                    threads=threads, progress=progress)
        out.setdefault("device_name", res["device_name"])
        out.setdefault("torch", res["torch"])
        out.setdefault("git_commit", res["git_commit"])
        out["threads"] = res["threads"]
        out[axis].append({
            "vocab": V,
            "hidden": H,
            "emb": res["config"]["emb"],
            "median_ms": {a["label"]: a["median_ms"] for a in res["arms"]},
            "ratio": {a["label"]: a["ratio_to_baseline"] for a in res["arms"]},
            "peak_mem_bytes": {a["label"]: a["peak_mem_bytes"] for a in res["arms"]},
            "errors": {a["label"]: a["error"] for a in res["arms"] if a["error"]},
        })
        print(f"{axis} V={V} H={H}: " + ", ".join(f"{k} {v:.2f}x" for k, v in out[axis][-1]["ratio"].items()
                                                  if v is not None), flush=True)
    return out


def plot_sweep(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, axis, key, label in ((axes[0], "vocab", "vocab", "vocabulary size"),
                                 (axes[1], "hidden", "hidden", "LSTM hidden size")):
        pts = res[axis]
        xs = [p[key] for p in pts]
        for arm in res["arms"]:
            if arm == BASELINE:
                continue
            ys = [p["ratio"].get(arm) for p in pts]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=arm)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.2, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(label + (f" (hidden {res['base_hidden']})" if axis == "vocab" else f" (vocab {res['base_vocab']})"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median step time / fused dropout step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"dropcheck bench sweep, {res['config_name']} (CPU, {res['threads']} thread; "
                 f"median of {res['repeats']} interleaved steps per point; dashed: 2.2x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.studies.bench",
                                description="sweep of the bench ratios over vocabulary and hidden size")
    p.add_argument("--config", default="cpu-ptb")
    p.add_argument("--vocabs", default="1000,3300,10000,33000")
    p.add_argument("--hiddens", default="100,200,400,800")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/bench/sweep-cpu-ptb", help="stem: writes STEM.json and STEM.png")
    a = p.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    res = sweep(a.config, vocabs=ints(a.vocabs), hiddens=ints(a.hiddens), warmup=a.warmup, repeats=a.repeats,
                threads=a.threads)
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=1, allow_nan=True) + "\n")
    plot_sweep(res, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(_sweep_main())
