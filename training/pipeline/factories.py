"""Model factories for ``dropcheck verify/taylor-map --model training.pipeline.factories:NAME``.

Each returns ``(model, inputs, targets)``: ``model(inputs)`` gives logits
``(T, B, V)``, ``targets`` the next words.  They need the PTB corpus
(``$DROPCHECK_DATA`` or ``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .configs import make_config
from .files import load_checkpoint, run_files
from .data import batchify, get_batch, load_corpus, resolve_corpus_dir
from ..models.awd_lstm import StatefulLM
from .trainer import build_lm, train


def _ptb_dir() -> Path:
    if os.environ.get("DROPCHECK_DATA"):
        return resolve_corpus_dir(None, "ptb")
    return resolve_corpus_dir(Path(__file__).resolve().parents[3] / "shared" / "data", "ptb")


def smoke_lm(steps: int = 300, seed: int = 1, batch: int = 8, seq_len: int = 20):
    """The ``smoke`` AWD-LSTM (real 10k PTB vocabulary, emb 32, 2 × 64, q = 0.4
    at every site) trained ``steps`` steps with dropout in float64, on the
    loop backend (double backward), with one validation batch of ``seq_len ×
    batch`` tokens and a zero incoming state."""
    cfg = make_config("smoke", dtype="float64", max_steps=steps, eval_every=steps, seed=seed,
                      progress=False, device="cpu")
    path = _ptb_dir()
    corpus = load_corpus(path)
    with tempfile.TemporaryDirectory() as out:
        res = train(cfg, data=str(path), out=out, config_name="smoke", corpus=corpus)
        state = load_checkpoint(res.best_path, "best model")["model"]
    lm = build_lm(cfg, corpus.vocab_size, torch.device("cpu"), torch.float64, "loop")
    lm.load_state_dict(state)
    X, Y = get_batch(batchify(corpus.valid, batch), 0, seq_len)
    return StatefulLM(lm), X, Y


_RUNS = Path(__file__).resolve().parents[2] / "results" / "runs"


def study_checkpoint(run: str, *, plan: str = "cpu-ptb", runs_dir=None) -> tuple[dict, dict]:
    """``(config, checkpoint)``: study run ``run``'s logged config and its best
    checkpoint (``<run>.best.pt``: ``model``, ``step``, ``valid_ppl``;
    git-ignored, so only where the run was made)."""
    from dropcheck import DropcheckError
    from paper_figures.logs import read_run

    folder = Path(runs_dir) if runs_dir is not None else _RUNS / plan
    files = run_files(folder, run)
    log, best = files.log, files.best
    logged = read_run(log, []) if log.exists() else None
    if logged is None or not best.exists():
        raise DropcheckError(f"{folder}: no log or no best checkpoint of {run!r} (checkpoints are not committed: "
                             f"run `dropcheck reproduce --plan {plan}` for it first)")
    return logged.header["config"], load_checkpoint(best, "best model")


def study_lm(run: str, *, plan: str = "cpu-ptb", batch: int = 10, seq_len: int = 35, runs_dir=None):
    """A trained study model (``study_checkpoint``) in float64 on the loop
    backend (double backward for the Hutchinson routes), with the first
    ``seq_len × batch`` validation tokens and a zero incoming state, like the
    evaluation's first batch."""
    cfg, ckpt = study_checkpoint(run, plan=plan, runs_dir=runs_dir)
    corpus = load_corpus(_ptb_dir())
    lm = build_lm(cfg, corpus.vocab_size, torch.device("cpu"), torch.float64, "loop")
    lm.load_state_dict(ckpt["model"])
    X, Y = get_batch(batchify(corpus.valid, batch), 0, seq_len)
    return StatefulLM(lm), X, Y


# ``dropcheck taylor-map --model training.pipeline.factories:NAME``: the cpu-ptb study's seed-1 models
def cpu_ptb_none():
    """The cpu-ptb model trained without regularization."""
    return study_lm("cpu-ptb-none-s1")


def cpu_ptb_dropout():
    """The cpu-ptb model trained with dropout (DROPOUT_1)."""
    return study_lm("cpu-ptb-dropout-k1-s1")


def cpu_ptb_explicit():
    """The cpu-ptb model trained with R_approx alone at λ."""
    return study_lm("cpu-ptb-explicit-x1-s1")
