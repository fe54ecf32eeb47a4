"""Fixtures for the training tests: a tiny synthetic corpus and tiny configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and", "<unk>", "N"]


def write_tiny_corpus(root: Path, lines: int = 120, seed: int = 0) -> Path:
    """A corpus in the train/valid/test.txt layout with a little structure
    (noun after article, verb after noun) so that a model can learn."""
    rng = random.Random(seed)
    arts, nouns, verbs, rest = ["the", "a"], ["cat", "dog", "mat", "log"], ["sat", "ran"], ["on", "and", "<unk>", "N"]

    def sentence() -> str:
        words = []
        for _ in range(rng.randint(1, 3)):
            words += [rng.choice(arts), rng.choice(nouns), rng.choice(verbs), rng.choice(rest)]
        return " " + " ".join(words) + " "

    root.mkdir(parents=True, exist_ok=True)
    # train holds every word type, so valid/test never meet an unknown word
    train = [" " + " ".join(WORDS) + " "] + [sentence() for _ in range(lines)]
    (root / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n".join(sentence() for _ in range(lines // 4)) + "\n", encoding="utf-8")
    (root / "test.txt").write_text("\n".join(sentence() for _ in range(lines // 4)) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def make_tiny_corpus():
    """``make_tiny_corpus(root, lines=120, seed=0)`` writes a tiny corpus and returns its folder."""
    return write_tiny_corpus


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("tinycorpus") / "tiny")


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_dir):
    from training.pipeline.data import load_corpus

    return load_corpus(tiny_corpus_dir)


# A tiny model and run on the tiny corpus: a handful of steps in well under a second.
TINY = dict(
    emb=5,
    hidden=6,
    layers=2,
    q_embedding=0.3,
    q_hidden=0.2,
    q_output=0.4,
    q_weights=0.25,
    q_rows=0.1,
    bptt=6,
    batch_size=4,
    eval_batch_size=2,
    test_batch_size=2,
    train_tokens=0,
    valid_tokens=0,
    test_tokens=0,
    lr=2.0,
    epochs=1,
    max_steps=8,
    eval_every=4,
    checkpoint_every=3,
    progress=False,
    threads=1,
    device="cpu",
)


# The same run on a tiny GPT-2 (arch=gpt2): the keys only the AWD-LSTM reads (its registry entry's
# ``keys``) stay at their defaults.
def _without_lstm_keys(cfg: dict) -> dict:
    from training.pipeline.lm import get_arch

    return {k: v for k, v in cfg.items() if k not in get_arch("awd-lstm").keys}


TINY_GPT2 = dict(
    _without_lstm_keys(TINY),
    arch="gpt2",
    emb=8,
    heads=2,
    q_embedding=0.3,
    q_attention=0.2,
    q_residual=0.25,
    q_head=0.15,
    variable_bptt=False,
    optimizer="sgd",
    lr=0.5,
)


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(**over)``: the tiny AWD-LSTM run, or with ``arch="gpt2"`` the
    tiny GPT-2 run (``smoke-gpt2`` with ``TINY_GPT2``)."""
    from training.pipeline.configs import make_config

    def make(**over):
        if over.get("arch") == "gpt2":
            return make_config("smoke-gpt2", **{**TINY_GPT2, **over})
        return make_config("smoke", **{**TINY, **over})

    return make
