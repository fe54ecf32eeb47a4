"""The paper's names for our update rules (Figures 1-5, Table 1)."""

from __future__ import annotations


def _mult(cfg: dict, key: str) -> str:
    m = cfg.get(key, 1.0)
    return "" if m in (1, 1.0, None) else f" (×{m:g})"


def arm_label(cfg: dict) -> str:
    """E.g. ``DROPOUT_4``, ``DROPOUT_4 + ξ̃_drop``, ``R_approx + ξ_approx``."""
    rule, k = cfg.get("rule", "?"), int(cfg.get("k", 1) or 1)
    noise = " + ξ_approx" if cfg.get("ablation_noise") else ""
    if rule == "none":
        return "no dropout"
    if rule == "l2":
        return f"ℓ2 ({cfg['l2']:g})" if "l2" in cfg else "ℓ2"
    if rule == "dropout":
        return f"DROPOUT_{k}"
    if rule == "dropout_inject":
        return f"DROPOUT_{k} + ξ̃_drop"
    if rule == "dropout_implicit":
        return f"DROPOUT_{k} + ξ_approx" + _mult(cfg, "implicit_mult")
    if rule == "explicit":
        return "R_approx" + _mult(cfg, "explicit_mult")
    if rule == "explicit_implicit":
        pos = ", per-position" if cfg.get("noise_structure") == "positions" else ""
        return "R_approx + ξ_approx" + _mult(cfg, "explicit_mult") + (f" ({pos[2:]})" if pos else "")
    if rule == "identity_hessian":
        return "identity H_out" + noise + _mult(cfg, "explicit_mult")
    if rule == "loss_jacobian":
        return "R̃_approx" + noise + _mult(cfg, "explicit_mult")
    return str(rule)
