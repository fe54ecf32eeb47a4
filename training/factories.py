"""Model factories for ``dropcheck verify/taylor-map --model training.factories:NAME``.

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
from .data import batchify, get_batch, load_corpus, resolve_corpus_dir
from .model import StatefulLM
from .trainer import build_lm, train


def _ptb_dir() -> Path:
    if os.environ.get("DROPCHECK_DATA"):
        return resolve_corpus_dir(None, "ptb")
    return resolve_corpus_dir(Path(__file__).resolve().parents[2] / "shared" / "data", "ptb")


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
        state = torch.load(res.best_path, map_location="cpu", weights_only=False)["model"]
    lm = build_lm(cfg, corpus.vocab_size, torch.device("cpu"), torch.float64, "loop")
    lm.load_state_dict(state)
    X, Y = get_batch(batchify(corpus.valid, batch), 0, seq_len)
    return StatefulLM(lm), X, Y
