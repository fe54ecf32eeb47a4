"""Shared test configuration.

Hypothesis profiles (select with the environment variable HYPOTHESIS_PROFILE):

- ``default``: light, for the default run (few examples, no deadline because
  autograd-heavy tests have unpredictable first-call costs);
- ``heavy``: many examples, for ``pytest -m heavy`` runs.

Corpora: ``DROPCHECK_DATA`` names the folder holding ``ptb/`` and
``wikitext-2/``; without it the tests look at ``../shared/data`` beside the
checkout.  When ``DROPCHECK_DATA`` is set the folder must exist (CI sets it);
otherwise the data tests are skipped with a reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test models are tiny: intra-op threads only add contention (measured
# 80x slower per call with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)

settings.register_profile(
    "default",
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "heavy",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    env = os.environ.get("DROPCHECK_DATA")
    if env:
        root = Path(env)
        if not (root / "ptb" / "train.txt").is_file():
            raise RuntimeError(f"DROPCHECK_DATA={env} does not hold ptb/train.txt")
        return root
    root = REPO.parent / "shared" / "data"
    if not (root / "ptb" / "train.txt").is_file():
        pytest.skip(f"no corpora at {root}; set DROPCHECK_DATA")
    return root
