"""The paper's names for our update rules (Figures 1-5, Table 1), read from
the torch-free label table ``paper_figures.rule_labels`` (the rule classes of
``training.pipeline.rules`` return the same names)."""

from __future__ import annotations

from .rule_labels import RULE_LABELS


def arm_label(cfg: dict) -> str:
    """E.g. ``DROPOUT_4``, ``DROPOUT_4 + ξ̃_drop``, ``R_approx + ξ_approx``;
    ``cfg`` is a log header's config (keys may be missing)."""
    rule = cfg.get("rule", "?")
    return RULE_LABELS[rule](cfg) if rule in RULE_LABELS else str(rule)
