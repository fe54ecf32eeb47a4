"""``dropcheck.testing``: a kit for property-based correctness suites on
your own dropout model (docs/testing.md).

- ``own_dropout_gap(model, inputs, targets, samples)``: the model's own
  train-mode Monte Carlo dropout gap with its standard error, the ground
  truth (BatchNorm kept in eval mode, ``ModelOutput.logits``, ``-100``
  targets ignored, draws replayed from a seed).
- Assertions with statistical tolerances, reporting the z-score and the
  inputs on failure: ``assert_gap_matches_own_dropout``,
  ``assert_second_order_holds``, ``assert_unbiased``.
- ``dropcheck.testing.strategies``: Hypothesis strategies (small networks
  with sites of every kind, inputs, targets with ``-100``, drop
  probabilities, seeds and generators).  Needs ``hypothesis``.
- A pytest plugin (registered by entry point): the ``heavy`` marker and
  the ``--heavy`` option (docs/testing.md).
"""

from ._asserts import (
    Comparison,
    assert_gap_matches_own_dropout,
    assert_second_order_holds,
    assert_unbiased,
    describe_inputs,
)
from ._networks import SITE_KINDS, Case, DropPath, SmallNet, build_case
from ._own import own_dropout_gap, own_loss
from ._stats import Z_MAX, mean_stderr, two_sample_z, zscore

__all__ = [
    "own_dropout_gap",
    "own_loss",
    "assert_gap_matches_own_dropout",
    "assert_second_order_holds",
    "assert_unbiased",
    "Comparison",
    "describe_inputs",
    "Z_MAX",
    "zscore",
    "mean_stderr",
    "two_sample_z",
    "SITE_KINDS",
    "Case",
    "build_case",
    "SmallNet",
    "DropPath",
    "strategies",
    "hypothesis_settings",
]


def hypothesis_settings(**overrides):
    """Hypothesis ``settings`` for autograd-heavy properties: no deadline
    (first calls compile and allocate), ``too_slow`` health check off, 10
    examples, or 100 when the run is heavy (pytest ``--heavy`` or
    ``DROPCHECK_HEAVY=1``); keywords override."""
    import os

    from hypothesis import HealthCheck, settings

    heavy = os.environ.get("DROPCHECK_HEAVY", "") not in ("", "0")
    kw = dict(max_examples=100 if heavy else 10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    kw.update(overrides)
    return settings(**kw)


def __getattr__(name):  # the strategies import hypothesis: on first use only
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module 'dropcheck.testing' has no attribute {name!r}")
