"""What a run must carry across an interruption, and where it goes.

- ``RunState``: counters, the interval accumulators, the carried hidden state
  and every generator (data order / BPTT lengths, the rule's noise), with
  ``state_dict()`` / ``load_state_dict()``.  Resuming restores it exactly, so
  a resumed run computes the numbers of an uninterrupted one.
- ``RunLog``: the JSON-lines log (header, one line per evaluation, final).
- ``Checkpointer``: writes and reads ``<run>.ckpt.pt`` atomically (model,
  optimizer, config, torch's global RNG, and every rank's ``RunState``), its
  SHA-256 in ``<run>.ckpt.pt.sha256`` (``files.save_checkpoint``); a resume
  reads it with ``weights_only=True`` after checking that digest, and
  refuses a checkpoint of another corpus (``corpus``: name, file checksums,
  vocabulary hash).

The checkpoint layout (``CKPT_VERSION`` 1): ``loop`` (the counters),
``data_gen`` (shared by all ranks), ``ranks`` (per rank: ``gens``,
``hidden``, ``acc``), beside ``model``, ``optimizer``, ``config`` and
``corpus`` (``data.Corpus.identity()``; absent from older checkpoints).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from dropcheck import DropcheckError
from paper_figures import log_schema

from .configs import DEFAULTS
from .files import atomic_write_bytes, load_checkpoint, open_append, save_checkpoint
from .lm import state_to
from .rules import Gens

CKPT_VERSION = 1
# Keys that may differ between a checkpoint and a resumed run (they change no number).
RESUME_MAY_DIFFER = ("progress", "threads", "checkpoint_every", "max_steps", "epochs", "patience", "device")

__all__ = ["CKPT_VERSION", "RESUME_MAY_DIFFER", "Counters", "RunState", "RunLog", "Checkpointer", "Diverged"]


class Diverged(DropcheckError):
    """The run diverged: a training or validation loss that is not finite, or
    whose perplexity overflows.  The run ends there, its log's ``final``
    record says ``"stop": "diverged"``, and nothing after it is trained."""

    def __init__(self, step: int, detail: str):
        self.step = step
        super().__init__(f"diverged at step {step}: {detail} (lower lr, or check the config)")


@dataclass
class Counters:
    """Plain numbers of a run (the checkpoint's ``loop``)."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    best_valid: float = math.inf
    best_step: int = -1
    best_eval: int = 0  # ``evals`` at the last improvement by more than ``min_improvement`` (patience)
    lr_scale: float = 1.0  # times ``lr_decay`` after each evaluation without such an improvement
    evals: int = 0
    log_lines: int = 0
    train_time: float = 0.0
    interval_time: float = 0.0
    interval_tokens: int = 0
    tokens_seen: int = 0


@dataclass
class RunState:
    """Everything of a run but the model and optimizer (module docstring)."""

    data_gen: torch.Generator
    gens: Gens
    hidden: list
    counters: Counters = field(default_factory=Counters)
    loss_sum: Optional[torch.Tensor] = None  # float64 sum of the interval's step losses (on the device)
    steps: int = 0  # steps in the interval
    reg_sum: dict = field(default_factory=dict)  # float64 sums of the interval's regularizer values
    grad_sum: dict = field(default_factory=dict)  # float64 sums of the pre-clip gradient norm and clipped steps

    def __post_init__(self):
        if self.loss_sum is None:
            dev = self.gens.local.device
            self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)

    # -- the interval accumulators ------------------------------------------
    def accumulate(self, loss: torch.Tensor, reg: Mapping[str, torch.Tensor],
                   grad: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.loss_sum += loss.double()
        self.steps += 1
        for sums, values in ((self.reg_sum, reg), (self.grad_sum, grad or {})):
            for k, v in values.items():
                sums[k] = sums.get(k, torch.zeros_like(self.loss_sum)) + v.double()

    def reset_interval(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.reg_sum = {}
        self.grad_sum = {}
        self.counters.interval_time = 0.0
        self.counters.interval_tokens = 0

    # -- (de)serialisation ---------------------------------------------------
    def rank_state(self) -> dict:
        """This rank's part: generators, hidden state, accumulators (on the CPU)."""
        snap = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731 - a copy, never a view of live state
        return {
            "gens": self.gens.state(),
            "hidden": state_to(self.hidden, snap),
            "acc": {"loss": snap(self.loss_sum), "steps": self.steps,
                    "reg": {k: snap(v) for k, v in self.reg_sum.items()},
                    "grad": {k: snap(v) for k, v in self.grad_sum.items()}},
        }

    def state_dict(self) -> dict:
        return {"loop": asdict(self.counters), "data_gen": self.data_gen.get_state(), "rank": self.rank_state()}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        known = {f.name for f in fields(Counters)}
        self.counters = Counters(**{k: v for k, v in st["loop"].items() if k in known})
        self.data_gen.set_state(st["data_gen"])
        mine = st["rank"]
        self.gens.load_state(mine["gens"])
        dev = self.loss_sum.device
        self.hidden = state_to(mine["hidden"], lambda t: t.to(dev))
        self.loss_sum = mine["acc"]["loss"].to(dev)
        self.steps = mine["acc"]["steps"]
        self.reg_sum = {k: v.to(dev) for k, v in mine["acc"]["reg"].items()}
        if "grad" in mine["acc"]:
            self.grad_sum = {k: v.to(dev) for k, v in mine["acc"]["grad"].items()}
        else:  # a checkpoint from before grad_norm: the interval's steps before it are unknown, so its means are NaN
            nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
            self.grad_sum = {"norm": nan.clone(), "clipped": nan.clone()} if self.steps else {}


class RunLog:
    """The run's JSON-lines log; only the main rank writes (``enabled``)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.lines = 0

    def truncate_to(self, n: int) -> None:
        """Keep the first ``n`` lines (those a checkpoint knew of)."""
        if not self.enabled:
            self.lines = n
            return
        if not self.path.exists():
            raise DropcheckError(f"cannot resume: log {self.path} is missing")
        kept = self.path.read_bytes().split(b"\n")[:n]
        if len(kept) < n:
            raise DropcheckError(f"cannot resume: log {self.path} has fewer lines than its checkpoint records")
        for i, line in enumerate(kept, 1):  # the part the checkpoint vouches for must be intact
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:  # UnicodeDecodeError included
                ok = False
            if not ok:
                raise DropcheckError(f"cannot resume: log {self.path}, line {i} (before the checkpoint) is damaged; "
                                     "restore the log, or start the run again with --overwrite")
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))
        self.lines = n

    def start(self) -> None:
        if self.enabled:
            atomic_write_bytes(self.path, b"")
        self.lines = 0

    def write(self, rec: Mapping[str, Any]) -> None:
        """Append one record; a record outside the log schema
        (``paper_figures.log_schema``, which the readers use) is refused."""
        wrong = log_schema.problems(rec)
        if wrong:
            raise DropcheckError(f"log {self.path}: {'; '.join(wrong)} (paper_figures/log_schema.py)")
        if self.enabled:
            with open_append(self.path) as f:
                f.write(json.dumps(rec, allow_nan=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.lines += 1


class Checkpointer:
    """``<run>.ckpt.pt``: save and restore a run (module docstring)."""

    def __init__(self, path: Path, *, cfg: Mapping[str, Any], config_name: str, run_name: str, world: int,
                 is_main: bool, corpus: Optional[Mapping[str, Any]] = None):
        self.path = path
        self.corpus = dict(corpus) if corpus is not None else None
        self.cfg = dict(cfg)
        self.config_name = config_name
        self.run_name = run_name
        self.world = world
        self.is_main = is_main

    def save(self, state: RunState, lm: torch.nn.Module, opt: torch.optim.Optimizer, log: RunLog) -> None:
        mine = state.rank_state()
        if self.world > 1:
            ranks: list = [None] * self.world
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not self.is_main:
            return
        state.counters.log_lines = log.lines
        device = state.loss_sum.device
        ckpt = {
            "version": CKPT_VERSION,
            "config": self.cfg,
            "config_name": self.config_name,
            "run_name": self.run_name,
            "world_size": self.world,
            "model": lm.state_dict(),
            "optimizer": opt.state_dict(),
            "loop": asdict(state.counters),
            "data_gen": state.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "ranks": ranks,
            "corpus": self.corpus,
        }
        save_checkpoint(ckpt, self.path)

    def load(self, state: RunState, lm: torch.nn.Module, opt: torch.optim.Optimizer, log: RunLog, rank: int) -> None:
        """Restore everything and truncate the log to the lines the checkpoint knew of."""
        ckpt = load_checkpoint(self.path)
        if ckpt.get("version") != CKPT_VERSION:
            raise DropcheckError(f"checkpoint {self.path}: unknown format version {ckpt.get('version')!r}")
        missing = [k for k in ("config", "world_size", "model", "optimizer", "loop", "data_gen", "torch_rng", "ranks")
                   if k not in ckpt]
        if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["ranks"], list):
            raise DropcheckError(f"checkpoint {self.path}: not a dropcheck run checkpoint (missing or malformed: "
                                 f"{', '.join(missing) or 'config/ranks'})")
        self._check_corpus(ckpt.get("corpus"))
        diff = sorted(k for k in DEFAULTS if k not in RESUME_MAY_DIFFER and ckpt["config"].get(k, DEFAULTS[k]) != self.cfg[k])
        if diff:
            pairs = ", ".join(f"{k}: {ckpt['config'].get(k, DEFAULTS[k])!r} -> {self.cfg[k]!r}" for k in diff)
            raise DropcheckError(f"cannot resume {self.path}: the config differs ({pairs})")
        if ckpt["world_size"] != self.world:
            raise DropcheckError(
                f"cannot resume {self.path}: it was written by {ckpt['world_size']} process(es), this run has {self.world}"
            )
        try:
            lm.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            state.load_state_dict({"loop": ckpt["loop"], "data_gen": ckpt["data_gen"], "rank": ckpt["ranks"][rank]})
            torch.set_rng_state(ckpt["torch_rng"])
            device = state.loss_sum.device
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DropcheckError(f"cannot resume {self.path}: its contents do not fit this run "
                                 f"({type(exc).__name__}: {first[:300]})") from None
        log.truncate_to(state.counters.log_lines)

    def _check_corpus(self, theirs: Optional[Mapping[str, Any]]) -> None:
        """Refuse a checkpoint of another corpus (a different file or vocabulary,
        even of the same size: every word index would mean another word)."""
        ours = self.corpus
        if ours is None or theirs is None:  # an older checkpoint: the model's shapes are still checked on load
            return
        if not isinstance(theirs, Mapping):
            raise DropcheckError(f"checkpoint {self.path}: malformed corpus record {theirs!r}")
        keys = ("name", "files", "vocab_size", "vocab_sha256")
        diff = [k for k in keys if theirs.get(k) != ours.get(k)]
        if diff:
            raise DropcheckError(f"cannot resume {self.path}: it was trained on another corpus ({theirs.get('name')!r}, "
                                 f"vocabulary {theirs.get('vocab_size')}) than this run's ({ours.get('name')!r}, "
                                 f"vocabulary {ours.get('vocab_size')}); differing: {', '.join(diff)}")
