"""Training loop: evaluation, JSON-lines logs, atomic checkpoints, resume,
data parallelism.

What a run writes (the log's records, the checkpoints and their SHA-256),
how resuming reproduces an uninterrupted run, and how the analytic
regularizers go through DistributedDataParallel are described in
docs/training.md ("The run log, checkpoints and resume"; "Data parallelism
and the analytic regularizers").
"""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dropcheck import DropcheckError, value_checks
from paper_figures import log_schema

from .configs import run_name as default_run_name, validate
from .files import (atomic_torch_save, atomic_write_bytes, load_checkpoint, remove_run_outputs,
                    remove_stale_temporaries, run_files, run_lock, save_checkpoint)
from .data import Corpus, batchify, check_corpus_name, get_batch, load_corpus, resolve_corpus_dir, sample_seq_len
from .lm import LanguageModel, StatefulLM, get_arch
from .rules import Gens, UpdateRule, make_rule, needs_double_backward, rule_class
from .state import CKPT_VERSION, RESUME_MAY_DIFFER, Checkpointer, Diverged, RunLog, RunState  # noqa: F401 (re-exported)


__all__ = [
    "train",
    "Trainer",
    "RunState",
    "RunLog",
    "Checkpointer",
    "make_gens",
    "stream_seed",
    "evaluate",
    "TrainResult",
    "build_lm",
    "make_optimizer",
    "resolve_backend",
    "atomic_write_bytes",
    "atomic_torch_save",
]


# --------------------------------------------------------------------------
# small utilities


def git_commit() -> Optional[str]:
    """``HEAD`` of the checkout (``-dirty`` with uncommitted changes to tracked
    files outside ``results/``, where the runs write their own logs); where
    there is no git repository (a copied tree) the value of
    ``$DROPCHECK_GIT_COMMIT``, else None."""
    sha = _git_head()
    return sha if sha is not None else (os.environ.get("DROPCHECK_GIT_COMMIT") or None)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``, else ``platform``)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def device_name(device: torch.device) -> str:
    """The GPU's name, or the processor's with its logical CPU count (benchmark
    and fd-check outputs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def cpu_kernels() -> dict:
    """The processor and the vector instruction set torch's CPU kernels use
    (``AVX512``, ``AVX2``, ...; ``ATEN_CPU_CAPABILITY`` lowers it).  Both change
    float rounding, which a first epoch at lr 20 grows into percent-level
    differences of validation perplexity; the header records them so that
    ``reproduce --recheck`` can tell a different machine from a regression."""
    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _git_head(here: Path = Path(__file__).resolve().parent) -> Optional[str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"],
            cwd=here, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DropcheckError(f"config key 'device': {spec!r} requested but CUDA is not available")
        if spec == "cuda":
            spec = f"cuda:{local_rank}"
    return torch.device(spec)


def _make_gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (2**63))
    return g


def stream_seed(seed: int, *parts: int) -> int:
    """A distinct 63-bit seed per stream, derived from the run's seed."""
    s = int(seed) * 1_000_003
    for p in parts:
        s = (s * 1_000_033 + int(p) + 7919) % (2**63 - 1)
    return s


# --------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(lm: LanguageModel, data: torch.Tensor, bptt: int) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) of ``lm`` without dropout over the
    batchified stream ``data`` ``(N, B)``, carrying the hidden state, and the
    number of tokens scored."""
    was = lm.training
    lm.eval()
    try:
        hidden = lm.init_state(data.size(1))
        total = torch.zeros((), dtype=torch.float64, device=data.device)
        n = 0
        for i in range(0, data.size(0) - 1, bptt):
            x, y = get_batch(data, i, bptt)
            logits, hidden = lm(x, hidden)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").double()
            n += y.numel()
        return float(total) / n, n
    finally:
        lm.train(was)


# --------------------------------------------------------------------------
# results


@dataclass
class TrainResult:
    run_name: str
    log_path: Path
    ckpt_path: Path
    best_path: Path
    step: int
    finished: bool
    best_valid_ppl: float
    test_ppl: Optional[float]
    records: list = field(default_factory=list)
    last_state: dict = field(default_factory=dict)  # the model's state after the last step
    stop_signal: Optional[int] = None  # the signal that stopped an unfinished run (SIGTERM, SIGINT)


class _Objective(nn.Module):
    """The rule's differentiable objective as one module forward (for DDP)."""

    def __init__(self, model: StatefulLM, rule: UpdateRule, gens: Gens):
        super().__init__()
        self.model = model
        self.rule = rule
        self.gens = gens

    def forward(self, x, y):
        res = self.rule.objective(self.model, x, y, self.gens)
        return res.objective, res.loss, res.reg, res.hidden


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# --------------------------------------------------------------------------
# distributed helpers


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t))
        off += n


# --------------------------------------------------------------------------
# building a run's parts


def resolve_backend(cfg: Mapping[str, Any], device: torch.device) -> str:
    """The LSTM backend of a run: ``auto`` is the loop LSTM on CUDA when the
    rule needs double backward, else the fused one; ``fused`` on CUDA with
    such a rule is an error (cuDNN has no double backward).  An architecture
    without the ``backend`` key has none (``"n/a"``)."""
    if "backend" not in get_arch(cfg.get("arch", "awd-lstm")).keys:
        return "n/a"
    backend = cfg["backend"]
    if backend == "auto":
        backend = "loop" if (device.type == "cuda" and needs_double_backward(cfg)) else "fused"
    if backend == "fused" and device.type == "cuda" and needs_double_backward(cfg):
        raise DropcheckError(
            f"rule {cfg['rule']!r} with estimator {cfg['estimator']!r} / noise_estimator "
            f"{cfg['noise_estimator']!r} needs double backward, which cuDNN's fused LSTM lacks: "
            "use backend=loop (or auto), or the fd estimators"
        )
    return backend


def build_lm(cfg: Mapping[str, Any], vocab: int, device: torch.device, dtype: torch.dtype,
             backend: str = "auto") -> LanguageModel:
    """The run's model (its ``arch``, ``training.pipeline.lm.ARCHS``), initialised from
    the run's seed; ``backend``: the LSTM's (``resolve_backend``)."""
    arch = get_arch(cfg.get("arch", "awd-lstm"))
    torch.manual_seed(stream_seed(cfg["seed"], 0))
    return arch.build({**cfg, "backend": backend}, vocab).to(device=device, dtype=dtype)


def make_optimizer(cfg: Mapping[str, Any], params: list) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def make_gens(seed: int, device: torch.device, world: int = 1, rank: int = 0) -> Gens:
    """The rule's noise generators: ``local`` per rank, ``shared`` seeded alike
    on every rank (the same object in one process; ``rules.py``)."""
    local = _make_gen(device, stream_seed(seed, 2, rank))
    shared = local if world == 1 else _make_gen(device, stream_seed(seed, 3))
    return Gens(local, shared)


# --------------------------------------------------------------------------
# the Trainer: one update (``step``) and one evaluation (``evaluate``)


class Trainer:
    """A run's model, update rule, optimizer and ``RunState``.

    ``step(x, y, hidden)`` makes one update and returns ``(loss, reg,
    new_hidden)`` (detached; also added to the interval accumulators);
    ``evaluate()`` scores the model without dropout on the validation text
    (and the clean training slice), updates the best / patience / lr-decay
    bookkeeping, saves the best model, and returns the eval record.
    ``dropcheck bench`` times ``step`` alone (no data needed).
    """

    def __init__(self, cfg: Mapping[str, Any], lm: LanguageModel, *, device: torch.device, world: int = 1, rank: int = 0,
                 valid_data: Optional[torch.Tensor] = None, train_eval: Optional[torch.Tensor] = None,
                 best_path: Optional[Path] = None, is_main: bool = True):
        self.cfg = dict(cfg)
        self.lm = lm
        self.model = StatefulLM(lm)
        self.rule: UpdateRule = make_rule(cfg, self.model)
        self.rule.check_world_size(world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, self.params)
        self.device, self.world, self.is_main = device, world, is_main
        self.valid_data, self.train_eval, self.best_path = valid_data, train_eval, best_path
        data_gen = _make_gen(torch.device("cpu"), stream_seed(cfg["seed"], 1))
        gens = make_gens(cfg["seed"], device, world, rank)
        per = cfg["batch_size"] // world
        self.state = RunState(data_gen, gens, lm.init_state(per))
        objective = _Objective(self.model, self.rule, gens)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.ddp = objective

    def lr(self, seq_len: int) -> float:
        """The step's learning rate: ``lr`` times the decay so far, scaled by
        the sequence length under variable BPTT (AWD-LSTM)."""
        lr = self.cfg["lr"] * self.state.counters.lr_scale
        return lr * seq_len / self.cfg["bptt"] if self.cfg["variable_bptt"] else lr

    def step(self, x: torch.Tensor, y: torch.Tensor, hidden: list):
        """One update: the rule's objective through DDP (when ``world > 1``) and
        one ``backward()``, the rule's noise all-reduced and added to
        ``.grad``, clipping, the optimizer step (module docstring).

        dropcheck's value checks are off inside: each reads a tensor's values
        (finite logits, target range, ``ignore_index``), a device-to-host sync
        per call on a GPU, several per step; the batches are corpus token ids,
        and a non-finite loss stops the run anyway."""
        for g in self.opt.param_groups:
            g["lr"] = self.lr(x.size(0))
        model = self.model
        model.hidden = hidden
        self.opt.zero_grad(set_to_none=True)
        with value_checks(False):
            obj, loss, reg, new_hidden = self.ddp(x, y)
            obj.backward()
            xi = self.rule.noise(model, x, y, self.state.gens)
        if xi is not None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            noise = [xi[n].detach().clone() for n, _ in named]
            _all_reduce_mean(noise, self.world)
            for (n, p), v in zip(named, noise):
                if p.grad is None:
                    p.grad = v
                else:
                    p.grad.add_(v)
        grad = {}
        if self.cfg["clip"]:  # the norm before clipping, kept on the device (no sync)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["clip"])
            grad = {"norm": norm, "clipped": norm > self.cfg["clip"]}
        self.opt.step()
        model.hidden = None
        self.state.accumulate(loss, reg, grad)
        return loss, reg, new_hidden

    def _interval_means(self) -> tuple[float, dict, dict]:
        """Interval means of the training loss, the regularizer values and the
        gradient statistics (``norm``, ``clipped``)."""
        st = self.state
        reg, grad = dict(st.reg_sum), dict(st.grad_sum)
        loss_sum = st.loss_sum.clone()
        if self.world > 1:
            _all_reduce_mean([loss_sum] + [reg[k] for k in sorted(reg)] + [grad[k] for k in sorted(grad)],
                             self.world)
        steps = max(st.steps, 1)
        train_loss = float(loss_sum) / steps if st.steps else math.nan
        return train_loss, *({k: float(v) / steps for k, v in sorted(d.items())} for d in (reg, grad))

    def evaluate(self, epoch: float) -> dict:
        """The eval record of the interval that just ended (module docstring)."""
        cfg, st, c = self.cfg, self.state, self.state.counters
        train_loss, reg, grad = self._interval_means()
        vloss, _ = evaluate(self.lm, self.valid_data, cfg["bptt"])
        # diverged: a loss that is not finite, or whose perplexity overflows float64 (exp(loss), loss >= 700 nats)
        if not math.isfinite(_ppl(vloss)) or (st.steps and not math.isfinite(_ppl(train_loss))):
            raise Diverged(c.step, f"train loss {train_loss}, valid loss {vloss}")
        vppl = _ppl(vloss)
        clean = evaluate(self.lm, self.train_eval, cfg["bptt"])[0] if self.train_eval is not None else math.nan
        c.evals += 1
        # patience and lr_decay count only improvements by more than min_improvement (relative)
        significant = vppl < c.best_valid * (1.0 - cfg["min_improvement"])
        if significant:
            c.best_eval = c.evals
        if vppl < c.best_valid:
            c.best_valid, c.best_step = vppl, c.step
            if self.is_main and self.best_path is not None:
                save_checkpoint({"model": self.lm.state_dict(), "step": c.step, "valid_ppl": vppl, "config": cfg},
                                self.best_path)
        tps = c.interval_tokens / c.interval_time if c.interval_time > 0 else math.nan
        lr_now = cfg["lr"] * c.lr_scale  # the rate this interval trained with
        if not significant:
            c.lr_scale *= cfg["lr_decay"]  # annealing on a plateau (1: constant rate)
        rec = {
            "type": "eval",
            "step": c.step,
            "epoch": epoch,
            "tokens_seen": c.tokens_seen,
            "train_loss": train_loss,
            "train_ppl": _ppl(train_loss) if st.steps else math.nan,
            "clean_train_loss": clean,
            "clean_train_ppl": _ppl(clean) if self.train_eval is not None else math.nan,
            "valid_loss": vloss,
            "valid_ppl": vppl,
            "best_valid_ppl": c.best_valid,
            "lr": lr_now,
            "next_lr": cfg["lr"] * c.lr_scale,
            "reg": reg,
            "grad_norm": grad.get("norm", math.nan),
            "clipped_frac": grad.get("clipped", math.nan),
            "wall_time": c.train_time,
            "tokens_per_s": tps,
        }
        st.reset_interval()
        return rec

    def out_of_patience(self) -> bool:
        c = self.state.counters
        return bool(self.cfg["patience"]) and c.evals - c.best_eval >= self.cfg["patience"]


# --------------------------------------------------------------------------
# the run


def _header(cfg, name, config_name, device, backend, world, corpus, tokens: dict, n_params: int,
            study: Optional[Mapping[str, str]] = None) -> dict:
    """The log's first record; what names the run for the figures and the claims is in it
    (``log_schema.RULE_LABEL``, and ``study``: a study arm's ``PLAN``, ``ARM``, ``CLAIM``)."""
    return {
        "type": log_schema.HEADER,
        "run_name": name,
        "config_name": config_name,
        "config": cfg,
        "seed": cfg["seed"],
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "arch": cfg.get("arch", "awd-lstm"),
        "backend": backend,
        "dtype": cfg["dtype"],
        "world_size": world,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **cpu_kernels(),
        "corpus": corpus.identity(cfg["corpus"]),  # name, file checksums, vocabulary hash: no machine path
        "vocab": corpus.vocab_size,
        **tokens,
        "parameters": n_params,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        log_schema.RULE_LABEL: rule_class(cfg["rule"]).label(cfg),
        **{k: study[k] for k in (log_schema.PLAN, log_schema.ARM, log_schema.CLAIM) if study},
    }


def _setup_process(cfg: Mapping[str, Any]) -> tuple[int, int, torch.device, torch.dtype]:
    """Process group, threads, determinism; returns ``(world, rank, device, dtype)``."""
    world, rank, local_rank = _dist_env()
    if world > 1 and cfg["batch_size"] % world:
        raise DropcheckError(
            f"config key 'batch_size': {cfg['batch_size']} is not divisible by the {world} processes"
        )
    device = _resolve_device(cfg["device"], local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["deterministic"]:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return world, rank, device, {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]


def _check_outputs(out: Path, log_path: Path, ckpt_path: Path, resume: bool, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not resume and not overwrite and (log_path.exists() or ckpt_path.exists()):
        raise DropcheckError(
            f"{log_path} or {ckpt_path} already exists: pass --resume to continue that run, "
            "--overwrite to start it again, or another --out / run_name"
        )
    if resume and not ckpt_path.exists():
        raise DropcheckError(f"cannot resume: no checkpoint {ckpt_path}")


@dataclass
class _RunData:
    """A run's token streams on its device: this rank's columns of the
    training stream (``per`` of them), the evaluation texts, and a fixed
    slice of the training text scored without dropout (the paper's training
    perplexity; ``None`` when ``train_eval_tokens`` is 0)."""

    train_tokens: int  # over all ranks
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_eval: Optional[torch.Tensor]
    per: int

    @property
    def rows(self) -> int:
        return self.train.size(0)

    def token_counts(self) -> dict:
        return {"train_tokens": self.train_tokens, "valid_tokens": int(self.valid.numel()),
                "test_tokens": int(self.test.numel())}


def _load_data(cfg: Mapping[str, Any], corpus: Corpus, device: torch.device, world: int, rank: int) -> _RunData:
    head = lambda t, n: t[:n] if n else t  # noqa: E731
    train_all = batchify(head(corpus.train, cfg["train_tokens"]), cfg["batch_size"])
    per = cfg["batch_size"] // world
    train_eval = (batchify(corpus.train[: cfg["train_eval_tokens"]], cfg["eval_batch_size"]).to(device)
                  if cfg["train_eval_tokens"] else None)
    return _RunData(
        train_tokens=int(train_all.numel()),
        train=train_all.to(device)[:, rank * per : (rank + 1) * per],
        valid=batchify(head(corpus.valid, cfg["valid_tokens"]), cfg["eval_batch_size"]).to(device),
        test=batchify(head(corpus.test, cfg["test_tokens"]), cfg["test_batch_size"]).to(device),
        train_eval=train_eval,
        per=per,
    )


def _progress_bar(cfg: Mapping[str, Any], d: _RunData, step: int, name: str):
    from tqdm import tqdm

    total = cfg["max_steps"] or max(1, int(d.rows / cfg["bptt"])) * cfg["epochs"]
    return tqdm(total=total, initial=step, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)


def _budget_spent(cfg: Mapping[str, Any], c) -> bool:
    return bool((cfg["max_steps"] and c.step >= cfg["max_steps"]) or (cfg["epochs"] and c.epoch >= cfg["epochs"]))


def _train_step(tr: "Trainer", d: _RunData, cfg: Mapping[str, Any], world: int, device: torch.device) -> bool:
    """One step on the next batch of the stream, timed, with the counters
    advanced; returns whether it ended the epoch (the caller resets)."""
    st, c = tr.state, tr.state.counters
    t0 = time.perf_counter()
    seq_len = sample_seq_len(st.data_gen, cfg["bptt"]) if cfg["variable_bptt"] else cfg["bptt"]
    x, y = get_batch(d.train, c.pos, seq_len)
    _loss, _reg, st.hidden = tr.step(x, y, st.hidden)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt, ntok = time.perf_counter() - t0, x.numel() * world
    c.step, c.pos, c.tokens_seen = c.step + 1, c.pos + seq_len, c.tokens_seen + ntok
    c.train_time, c.interval_time, c.interval_tokens = c.train_time + dt, c.interval_time + dt, c.interval_tokens + ntok
    return c.pos >= d.rows - 2


def _test_best(tr: "Trainer", lm: LanguageModel, d: _RunData, best_path: Path, world: int, stopped_early: bool) -> dict:
    """The ``final`` record: the best checkpoint's test and validation perplexity."""
    c, cfg = tr.state.counters, tr.cfg
    if world > 1:
        dist.barrier()
    lm.load_state_dict(load_checkpoint(best_path, "best model")["model"])
    tloss, tn = evaluate(lm, d.test, cfg["bptt"])
    vloss, _ = evaluate(lm, d.valid, cfg["bptt"])
    return {
        "type": "final",
        "step": c.step,
        "best_step": c.best_step,
        "best_valid_ppl": c.best_valid,
        "stop": "patience" if stopped_early else "budget",
        "valid_ppl": _ppl(vloss),
        "test_loss": tloss,
        "test_ppl": _ppl(tloss),
        "test_tokens": tn,
        "wall_time": c.train_time,
        "tokens_per_s": c.tokens_seen / c.train_time if c.train_time > 0 else math.nan,
    }


class _StopOnSignal:
    """SIGTERM, or a first Ctrl-C (SIGINT), asks the training loop to stop at the
    next step boundary: it writes a checkpoint there and returns an unfinished
    run, so no step since the last checkpoint is lost (a batch system's or
    ``dropcheck reproduce``'s stop, the end of a session).  A second Ctrl-C
    interrupts at once.  Only in the main thread of a single-process run: the
    ranks of a distributed run could see the signal at different steps."""

    def __init__(self, enabled: bool):
        self.signum: Optional[int] = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "_StopOnSignal":
        if self._enabled:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


def train(
    cfg: Mapping[str, Any],
    *,
    data: Optional[str] = None,
    out: str | os.PathLike = "runs",
    resume: bool = False,
    overwrite: bool = False,
    config_name: str = "custom",
    stop_after: Optional[int] = None,
    corpus: Optional[Corpus] = None,
    study: Optional[Mapping[str, str]] = None,
) -> TrainResult:
    """Run (or resume) one training run; returns a ``TrainResult``.

    ``cfg``: a validated config (``configs.get_config``).  ``stop_after``:
    stop after that many steps in total, writing a checkpoint (to simulate
    an interruption; the run is not finished).  ``corpus``: an already
    loaded corpus (tests), else it is read from ``data``/``$DROPCHECK_DATA``.
    ``study``: ``{"plan", "arm", "claim"}`` of a study arm's run (``dropcheck
    train --arm PLAN:ARM``), written into the log header for the figures.
    """
    cfg = validate(cfg)
    world, rank, device, dtype = _setup_process(cfg)
    name, out = default_run_name(config_name, cfg), Path(out)
    # one process per run: a second driver or a stray resume cannot write the same log and checkpoints
    with run_lock(run_files(out, name).lock, enabled=rank == 0):
        return _run(cfg, name, out, world, rank, device, dtype, data=data, resume=resume, overwrite=overwrite,
                    config_name=config_name, stop_after=stop_after, corpus=corpus, study=study)


def _run(cfg: Mapping[str, Any], name: str, out: Path, world: int, rank: int, device: torch.device,
         dtype: torch.dtype, *, data: Optional[str], resume: bool, overwrite: bool, config_name: str,
         stop_after: Optional[int], corpus: Optional[Corpus], study: Optional[Mapping[str, str]] = None
         ) -> TrainResult:
    """``train``'s body, under the run's lock."""
    is_main = rank == 0
    files = run_files(out, name)
    log_path, ckpt_path, best_path = files.log, files.ckpt, files.best
    if is_main:
        _check_outputs(out, log_path, ckpt_path, resume, overwrite)
        remove_stale_temporaries(files)  # of writes a kill interrupted; we hold the run's lock
        if overwrite and not resume:  # the old run's best.pt must not stand in for a new run that never improves
            remove_run_outputs(files)
    if corpus is None:
        corpus = load_corpus(resolve_corpus_dir(data, cfg["corpus"]))
    check_corpus_name(corpus, cfg["corpus"])
    d = _load_data(cfg, corpus, device, world, rank)

    # ---- model, rule, optimizer, state; log and checkpoints beside them
    backend = resolve_backend(cfg, device)
    lm = build_lm(cfg, corpus.vocab_size, device, dtype, backend)
    tr = Trainer(cfg, lm, device=device, world=world, rank=rank, valid_data=d.valid, train_eval=d.train_eval,
                 best_path=best_path, is_main=is_main)
    st = tr.state
    log = RunLog(log_path, is_main)
    ckpt = Checkpointer(ckpt_path, cfg=cfg, config_name=config_name, run_name=name, world=world, is_main=is_main,
                        corpus=corpus.identity(cfg["corpus"]))
    if resume:
        ckpt.load(st, lm, tr.opt, log, rank)
        log.write({"type": "resume", "step": st.counters.step, "epoch": st.counters.epoch, "time": time.time()})
    else:
        log.start()
        log.write(_header(cfg, name, config_name, device, backend, world, corpus, d.token_counts(),
                          sum(p.numel() for p in tr.params), study))
    c = st.counters

    # ---- the loop
    bar = _progress_bar(cfg, d, c.step, name) if cfg["progress"] and is_main else None
    records: list = []
    last_ckpt_step, stopped, stopped_early = c.step, False, False

    def eval_and_log() -> dict:
        """Evaluate (fractional epoch from the stream position), log and keep the record;
        a diverged run ends with a ``final`` record that says so, and raises."""
        try:
            rec = tr.evaluate(c.epoch + min(1.0, c.pos / max(d.rows - 2, 1)))
        except Diverged as exc:
            log.write({"type": "final", "step": c.step, "stop": "diverged", "diverged": str(exc),
                       "best_step": c.best_step, "best_valid_ppl": c.best_valid, "test_ppl": math.nan,
                       "wall_time": c.train_time})
            raise
        log.write(rec)
        records.append(rec)
        return rec

    tr.model.train()
    with _StopOnSignal(world == 1) as stop:
        try:
            while not _budget_spent(cfg, c):
                if (stop_after is not None and c.step >= stop_after) or stop.signum is not None:
                    stopped = True
                    break
                epoch_end = _train_step(tr, d, cfg, world, device)
                if bar is not None:
                    bar.update(1)
                did_eval = bool(cfg["eval_every"] and c.step % cfg["eval_every"] == 0) or (epoch_end and not cfg["eval_every"])
                if did_eval:
                    rec = eval_and_log()
                    if bar is not None:
                        bar.set_postfix(valid_ppl=f"{rec['valid_ppl']:.2f}", train_ppl=f"{rec['train_ppl']:.2f}")
                if epoch_end:
                    c.epoch, c.pos = c.epoch + 1, 0
                    st.hidden = lm.init_state(d.per)
                if did_eval or (cfg["checkpoint_every"] and c.step % cfg["checkpoint_every"] == 0):
                    ckpt.save(st, lm, tr.opt, log)
                    last_ckpt_step = c.step
                if did_eval and tr.out_of_patience():
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
        if stopped and last_ckpt_step != c.step:
            ckpt.save(st, lm, tr.opt, log)

    last_state = {k: v.detach().cpu().clone() for k, v in lm.state_dict().items()}
    if stopped:
        return TrainResult(name, log_path, ckpt_path, best_path, c.step, False, c.best_valid, None, records, last_state,
                           stop.signum)

    # ---- final: evaluate the last interval if needed, then test the best model
    if st.steps or c.evals == 0:
        eval_and_log()
    ckpt.save(st, lm, tr.opt, log)
    final = _test_best(tr, lm, d, best_path, world, stopped_early)
    log.write(final)
    records.append(final)
    return TrainResult(name, log_path, ckpt_path, best_path, c.step, True, c.best_valid, final["test_ppl"], records,
                       last_state)


# --------------------------------------------------------------------------
# several processes from Python (tests; on a cluster use torchrun)


def _spawn_entry(rank: int, world: int, port: int, jobs: list, corpus_dir: Optional[str]) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    try:
        corpus = load_corpus(corpus_dir) if corpus_dir is not None else None
        for cfg, kwargs in jobs:
            kwargs = dict(kwargs)
            dump = kwargs.pop("dump", None)
            res = train(cfg, corpus=corpus, **kwargs)
            if dump is not None:  # every rank's last parameters, to check that the replicas agree
                Path(dump).mkdir(parents=True, exist_ok=True)
                atomic_torch_save(res.last_state, Path(dump) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_train(world: int, jobs: list, *, corpus_dir: Optional[str] = None) -> None:
    """Run ``train(cfg, **kwargs)`` for each ``(cfg, kwargs)`` of ``jobs``, one
    after the other, in ``world`` CPU processes (gloo backend) started with
    ``torch.multiprocessing.spawn`` (on a cluster use ``torchrun``).  Every
    process loads the corpus from ``corpus_dir`` (else ``kwargs['data']``);
    ``kwargs['dump'] = DIR`` saves each rank's last parameters as
    ``DIR/rank<r>.pt``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = [(dict(cfg), dict(kw)) for cfg, kw in jobs]
    mp.spawn(_spawn_entry, args=(world, port, jobs, corpus_dir), nprocs=world, join=True)
