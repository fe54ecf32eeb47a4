"""The paper's names for our update rules (Figures 1-5, Table 1), read from
the rule registry (``training.rules.REGISTRY``)."""

from __future__ import annotations

from training.rules import REGISTRY


def arm_label(cfg: dict) -> str:
    """E.g. ``DROPOUT_4``, ``DROPOUT_4 + ξ̃_drop``, ``R_approx + ξ_approx``;
    ``cfg`` is a log header's config (keys may be missing)."""
    rule = cfg.get("rule", "?")
    return REGISTRY[rule].label(cfg) if rule in REGISTRY else str(rule)
