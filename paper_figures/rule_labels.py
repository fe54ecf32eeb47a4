"""The paper's names for the update rules (Figures 1-5, Table 1), without torch.

One entry per value of the config key ``rule``: a function of a run's config
(a log header's config; keys may be missing) that gives the arm's name in the
paper's terms, e.g. ``DROPOUT_4 + ξ̃_drop`` or ``R_approx + ξ_approx (×1.5)``.
The rule classes of ``training.pipeline.rules`` (``UpdateRule.label``) return these
same names by calling :func:`rule_label`, so the names are written once, here,
where the figures and the claims can read them without importing torch or the
trainer.  ``tests/paper_figures/test_rule_labels.py`` fails when a registered
rule has no entry here, or an entry no rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Config = Mapping[str, Any]


def _mult(cfg: Config, key: str) -> str:
    m = cfg.get(key, 1.0)
    return "" if m in (1, 1.0, None) else f" (×{m:g})"


def _dropout_k(cfg: Config) -> str:
    return f"DROPOUT_{int(cfg.get('k', 1) or 1)}"


def _ablation(short: str) -> Callable[[Config], str]:
    def label(cfg: Config) -> str:
        noise = " + ξ_approx" if cfg.get("ablation_noise") else ""
        return short + noise + _mult(cfg, "explicit_mult")
    return label


RULE_LABELS: dict[str, Callable[[Config], str]] = {
    "none": lambda cfg: "no dropout",
    "l2": lambda cfg: f"ℓ2 ({cfg['l2']:g})" if "l2" in cfg else "ℓ2",
    "dropout": _dropout_k,
    "dropout_inject": lambda cfg: _dropout_k(cfg) + " + ξ̃_drop",
    "dropout_implicit": lambda cfg: _dropout_k(cfg) + " + ξ_approx" + _mult(cfg, "implicit_mult"),
    "explicit": lambda cfg: "R_approx" + _mult(cfg, "explicit_mult"),
    "explicit_implicit": lambda cfg: (
        "R_approx + ξ_approx" + _mult(cfg, "explicit_mult")
        + (" (per-position)" if cfg.get("noise_structure") == "positions" else "")),
    "identity_hessian": _ablation("identity H_out"),
    "loss_jacobian": _ablation("R̃_approx"),
}


def check_rules(*rules: str) -> None:
    """Raise ``ValueError`` for a name that is no registered rule (a selector
    naming a renamed or unknown rule would otherwise select nothing)."""
    unknown = [r for r in rules if r not in RULE_LABELS]
    if unknown:
        raise ValueError(f"no update rule {unknown[0] if len(unknown) == 1 else unknown!r}; "
                         f"known: {list(RULE_LABELS)}")


def rule_label(rule: str, cfg: Config) -> str:
    """The paper's name of config value ``rule`` under config ``cfg``."""
    return RULE_LABELS[rule](cfg)
