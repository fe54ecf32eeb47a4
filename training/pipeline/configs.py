"""Run configurations: defaults, the named configs, overrides, validation.

A config is a flat dict; ``DEFAULTS`` lists every key with its default and
so its type.  ``get_config(name_or_file, overrides)``: a name from
``CONFIGS``, or a JSON file holding an object of keys (optionally
``"base": NAME`` to start from a named config), then ``key=value``
overrides parsed with the type of the default.  Unknown keys and bad values
raise one ``DropcheckError`` naming the key.

Named configs:

- ``ptb``, ``wikitext2``: the paper's setting (Wei, Kakade & Ma 2020,
  Section 6 / Appendix D, on AWD-LSTM): emb 400, 3 x 1150 LSTM, tied, q = 0.4
  on embedding, hidden, output and DropConnect, SGD lr 30, clip 0.25,
  weight decay 1.2e-6, BPTT 70 (variable), batch 20 (eval 10, test 1).  The
  explicit term uses the sampled-label estimator, as the official code.
- ``smoke``: a CPU check that runs in about a minute on 2 cores: the real
  PTB vocabulary (10,000 words) and a 64k-token slice of the training
  text, a tiny model (emb 32, 2 x 64), 3 evaluations on a validation slice.
- ``mini-ptb``, ``mini-wikitext2``: short GPU runs (2 x 512, emb 256,
  batch 32; 4 epochs of PTB, 2 of WikiText-2; test batch 10 instead of 1);
  the analytic terms use the finite-difference estimators so that every arm
  but ``loss_jacobian`` runs on the fused cuDNN LSTM (measured earlier on an
  H100, in notes outside this repository: about 1.3-1.8 x the cuDNN dropout
  step, which is 14 ms at the full size).
  Estimated, not measured (no GPU was lent while writing this): ~415 steps
  per PTB epoch, well under 10 ms per step, so about 0.5-1 min per
  DROPOUT_1 / explicit / implicit arm; DROPOUT_k costs about k times
  DROPOUT_1 (k = 32: several minutes), and ``loss_jacobian`` has no
  first-order estimator in dropcheck, so it needs the loop LSTM (double
  backward), several minutes.  The arms behind the paper's claims C1-C6
  are the study plans of ``study.py`` (``dropcheck train --list`` prints them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from dropcheck import DropcheckError

from .lm import ARCHS, all_groups, get_arch
from .rules import REGISTRY

GROUPS = all_groups()  # the site groups of every architecture (per-group coefficient keys)

RULES = tuple(REGISTRY)  # the values of config key "rule", one class each in rules.py

DEFAULTS: dict[str, Any] = {
    # data
    "corpus": "ptb",
    "train_tokens": 0,  # 0: all; else the first N training tokens (vocabulary stays full)
    "valid_tokens": 0,
    "test_tokens": 0,
    # model (arch: a key of training.pipeline.lm.ARCHS; keys marked with an arch are read by it alone)
    "arch": "awd-lstm",
    "emb": 400,
    "hidden": 1150,
    "layers": 3,
    "tie": True,
    "q_embedding": 0.4,
    "q_hidden": 0.4,
    "q_output": 0.4,
    "q_weights": 0.4,
    "q_rows": 0.0,
    "backend": "auto",  # auto | loop | fused
    "lstm_init": "uniform",  # uniform (nn.LSTM's) | xavier (the official code's: Xavier weights, zero biases)
    "heads": 4,  # gpt2: attention heads
    "q_attention": 0.0,  # gpt2: attention-probability dropout (attn_pdrop)
    "q_residual": 0.0,  # gpt2: dropout before each residual add (resid_pdrop)
    "q_head": 0.0,  # gpt2: dropout on the last layer's features entering the tied decoder (group output)
    # update rule
    "rule": "dropout",
    "k": 1,
    "estimator": "sampled",  # exact | sampled | hutchinson | fd   (R_approx); fd_shared, fd_mid: the rules
    # with shared_probe_ok (explicit, explicit_implicit, dropout_implicit, identity_hessian), one probe shared by
    # R_approx and ξ_approx (dc.analytic_dropout_objective; rules.py)
    "samples": 1,
    "noise_structure": "locked",  # locked: the analytic terms keep locked sites' cross-time terms;
    # positions: every position independent (the official code's treatment), for R_approx and ξ_approx
    "noise_estimator": "autograd",  # autograd | fd   (ξ_approx)
    "eps": 0.0,  # finite-difference step; 0: dropcheck's default for the dtype
    "explicit_mult": 1.0,  # explicit coefficient = λ_g · explicit_mult · explicit_mult_<g>
    "implicit_mult": 1.0,  # noise coefficient = implicit_mult · implicit_mult_<g>
    **{f"explicit_mult_{g}": 1.0 for g in GROUPS},
    **{f"implicit_mult_{g}": 1.0 for g in GROUPS},
    "ablation_noise": False,  # identity_hessian / loss_jacobian: also add ξ_approx
    "l2": 1e-5,  # coefficient of (l2/2)·Σ‖W‖² for rule l2
    # optimisation
    "optimizer": "sgd",  # sgd | adam
    "lr": 30.0,
    "clip": 0.25,  # 0: no clipping
    "lr_decay": 1.0,  # multiply lr by this after each evaluation without a new best (1: constant)
    "weight_decay": 1.2e-6,
    "bptt": 70,
    "variable_bptt": True,
    "batch_size": 20,
    "eval_batch_size": 10,
    "test_batch_size": 1,
    "epochs": 50,
    "max_steps": 0,  # 0: no limit
    "patience": 0,  # stop after this many evaluations without a new best validation perplexity; 0: never
    "min_improvement": 0.0,  # relative: a new best must beat the old by this fraction to reset patience / lr_decay
    # bookkeeping
    "eval_every": 0,  # steps; 0: at the end of every epoch
    "train_eval_tokens": 20_000,  # clean (dropout-off) perplexity on the first N training tokens at each eval; 0: off
    "checkpoint_every": 200,  # steps (also after every evaluation)
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "dtype": "float32",  # float32 | float64
    "deterministic": False,
    "threads": 0,  # CPU threads; 0: leave torch's default
    "progress": True,
    "run_name": "",  # "": <config>-<rule>[-k<k>]-s<seed>
    "seed": 1,
}

CHOICES: dict[str, tuple] = {
    "corpus": ("ptb", "wikitext-2"),
    "arch": tuple(ARCHS),
    "backend": ("auto", "loop", "fused"),
    "lstm_init": ("uniform", "xavier"),
    "noise_structure": ("locked", "positions"),
    "rule": RULES,
    "estimator": ("exact", "sampled", "hutchinson", "fd", "fd_shared", "fd_mid"),
    "noise_estimator": ("autograd", "fd"),
    "optimizer": ("sgd", "adam"),
    "dtype": ("float32", "float64"),
}

POSITIVE_INT = ("emb", "hidden", "layers", "heads", "k", "samples", "bptt", "batch_size", "eval_batch_size", "test_batch_size")
NONNEG_INT = ("train_tokens", "valid_tokens", "test_tokens", "train_eval_tokens", "epochs", "patience", "max_steps", "eval_every", "checkpoint_every", "threads", "seed")
NONNEG_FLOAT = (
    "eps", "explicit_mult", "implicit_mult", "l2", "lr", "clip", "weight_decay", "lr_decay", "min_improvement",
    *(f"explicit_mult_{g}" for g in GROUPS),
    *(f"implicit_mult_{g}" for g in GROUPS),
)
PROBS = ("q_embedding", "q_hidden", "q_output", "q_weights", "q_rows", "q_attention", "q_residual", "q_head")

_PAPER = {
    "corpus": "ptb",
    "emb": 400,
    "hidden": 1150,
    "layers": 3,
    "q_embedding": 0.4,
    "q_hidden": 0.4,
    "q_output": 0.4,
    "q_weights": 0.4,
    "q_rows": 0.0,
    "lr": 30.0,
    "clip": 0.25,
    "weight_decay": 1.2e-6,
    "bptt": 70,
    "batch_size": 20,
    "eval_batch_size": 10,
    "test_batch_size": 1,
    "estimator": "sampled",
    "epochs": 50,
}

_MINI = {
    "emb": 256,
    "hidden": 512,
    "layers": 2,
    "batch_size": 32,
    "eval_batch_size": 10,
    "test_batch_size": 10,
    "epochs": 4,
    "estimator": "fd",
    "noise_estimator": "fd",
    "checkpoint_every": 500,
}

# What the CPU studies share (cpu-ptb, cpu-ptb-gpt2): batches, the schedule (at most 20 epochs; the lr
# divided by 4 after an epoch that does not improve the best validation perplexity by 0.5%; stop after 3
# such epochs), one thread per run, the first-order estimators.
_CPU_STUDY = {
    "batch_size": 20,
    "eval_batch_size": 10,
    "test_batch_size": 10,
    "epochs": 20,
    "patience": 3,
    "lr_decay": 0.25,
    "min_improvement": 0.005,
    "checkpoint_every": 100,
    "device": "cpu",
    "estimator": "fd",
    "noise_estimator": "fd",
    "threads": 1,
}

_SMOKE = {
    "corpus": "ptb",
    "train_tokens": 64_000,
    "valid_tokens": 12_000,
    "test_tokens": 12_000,
    "emb": 32,
    "hidden": 64,
    "layers": 2,
    "q_embedding": 0.4,
    "q_hidden": 0.4,
    "q_output": 0.4,
    "q_weights": 0.4,
    "lr": 20.0,
    "clip": 0.25,
    "bptt": 20,
    "batch_size": 16,
    "eval_batch_size": 10,
    "test_batch_size": 10,
    "epochs": 2,
    "max_steps": 300,
    "eval_every": 100,
    "checkpoint_every": 100,
    "device": "cpu",
    "estimator": "sampled",
    "threads": 1,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "ptb": dict(_PAPER),
    "wikitext2": {**_PAPER, "corpus": "wikitext-2"},
    "smoke": _SMOKE,
    # The CPU study (issue: claims C1-C6 at CPU scale): the full 10k PTB
    # vocabulary, a 200k-token slice of the training text (so that an
    # unregularized run overfits within a few epochs), a 2 x 200 LSTM (tied,
    # emb 200), a 30k-token validation slice, the whole test text; one thread
    # per run so two runs go side by side on a 2-core machine; the learning
    # rate is divided by 4 after an epoch that does not improve the best
    # validation perplexity by 0.5% and the run stops after 3 such epochs
    # (at most 20 epochs; CPU_PILOT: a fixed
    # short budget measures speed of convergence, not the regularizer; the
    # first pilot at a constant lr 20 oscillated by +-20% between epochs).  Analytic terms by the
    # first-order finite-difference estimators (fused LSTM).
    "cpu-ptb": {
        "corpus": "ptb",
        "train_tokens": 200_000,
        "valid_tokens": 30_000,
        "test_tokens": 0,
        "train_eval_tokens": 30_000,
        "emb": 200,
        "hidden": 200,
        "layers": 2,
        "lr": 20.0,
        "clip": 0.25,
        "bptt": 35,
        **_CPU_STUDY,
    },
    # GPT-2 (arch=gpt2, training/models/gpt2.py): the smoke check's data and budget on a 2-layer, 32-wide
    # GPT-2 with fixed 20-token segments and q = 0.1 at every site (embedding, attention, residual).
    "smoke-gpt2": {
        **{k: v for k, v in _SMOKE.items() if k not in ("hidden", "q_hidden", "q_output", "q_weights")},
        "arch": "gpt2",
        "emb": 32,
        "layers": 2,
        "heads": 2,
        "q_embedding": 0.1,
        "q_attention": 0.1,
        "q_residual": 0.1,
        "variable_bptt": False,
        "optimizer": "adam",
        "lr": 1e-3,
        "clip": 1.0,
        "weight_decay": 0.0,
    },
    # The CPU study of Table 2 and claim C7 (training/studies/study.py, plan cpu-ptb-gpt2): PTB's full vocabulary
    # (WikiText-2's 33k words made a dropout step 4.4x slower in the pilot's bench: results/cpu-ptb-gpt2/
    # README.md), a 2-layer GPT-2 (emb 128, 4 heads) on fixed 35-token segments, q at every site, Adam,
    # one thread per run.  The training slice, the optimizer and the schedule are the pilot's.
    "cpu-ptb-gpt2": {
        "corpus": "ptb",
        "arch": "gpt2",
        "train_tokens": 200_000,
        "valid_tokens": 30_000,
        "test_tokens": 0,
        "train_eval_tokens": 30_000,
        "emb": 128,
        "layers": 2,
        "heads": 4,
        "q_embedding": 0.1,
        "q_attention": 0.1,
        "q_residual": 0.1,
        # SGD at 0.5 (the pilot's best at both sizes: 280.95 at 1x and 453.33 at 0.2x without dropout,
        # against Adam's best 315.87 and 515.79)
        "optimizer": "sgd",
        "lr": 0.5,
        "clip": 1.0,
        "weight_decay": 0.0,
        "bptt": 35,
        "variable_bptt": False,
        **_CPU_STUDY,
    },
    "mini-ptb": {**_PAPER, **_MINI},
    "mini-wikitext2": {**_PAPER, **_MINI, "corpus": "wikitext-2", "epochs": 2},
}

def _err(key: str, msg: str) -> DropcheckError:
    return DropcheckError(f"config key {key!r}: {msg}")


def parse_value(key: str, text: str) -> Any:
    """Parse ``text`` with the type of ``DEFAULTS[key]``."""
    if key not in DEFAULTS:
        raise unknown_key(key)
    default = DEFAULTS[key]
    t = text.strip()
    if isinstance(default, bool):
        low = t.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise _err(key, f"expected a boolean (true/false), got {text!r}")
    if isinstance(default, int):
        try:
            return int(t)
        except ValueError:
            try:
                f = float(t)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
            raise _err(key, f"expected an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(t)
        except ValueError:
            raise _err(key, f"expected a number, got {text!r}") from None
    return text


def unknown_key(key: str) -> DropcheckError:
    import difflib

    close = difflib.get_close_matches(key, list(DEFAULTS), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return DropcheckError(f"unknown config key {key!r}{hint}; see `dropcheck train --list-keys`")


def _coerce(key: str, value: Any) -> Any:
    """Type-check a value given in a JSON file or a dict."""
    if key not in DEFAULTS:
        raise unknown_key(key)
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _err(key, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise _err(key, f"expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(key, f"expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise _err(key, f"expected a string, got {value!r}")
    return value


def validate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value; returns a plain dict."""
    out = {}
    for key, value in cfg.items():
        out[key] = _coerce(key, value)
    missing = [k for k in DEFAULTS if k not in out]
    if missing:
        raise DropcheckError(f"config lacks key(s) {missing}")
    for key, choices in CHOICES.items():
        if out[key] not in choices:
            raise _err(key, f"expected one of {list(choices)}, got {out[key]!r}")
    for key in POSITIVE_INT:
        if out[key] < 1:
            raise _err(key, f"must be >= 1, got {out[key]}")
    for key in NONNEG_INT:
        if out[key] < 0:
            raise _err(key, f"must be >= 0, got {out[key]}")
    for key in NONNEG_FLOAT:
        v = out[key]
        if not math.isfinite(v) or v < 0:
            raise _err(key, f"must be a finite number >= 0, got {v}")
    for key in PROBS:
        v = out[key]
        if not (0.0 <= v < 1.0):
            raise _err(key, f"drop probability must lie in [0, 1), got {v}")
    if out["min_improvement"] >= 1:
        raise _err("min_improvement", f"must lie in [0, 1), got {out['min_improvement']}")
    if not 0 < out["lr_decay"] <= 1:
        raise _err("lr_decay", f"must lie in (0, 1], got {out['lr_decay']}")
    if out["lr"] <= 0:
        raise _err("lr", f"must be > 0, got {out['lr']}")
    dev = out["device"]
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise _err("device", f"expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if out["epochs"] == 0 and out["max_steps"] == 0:
        raise _err("epochs", "epochs and max_steps are both 0: the run would never stop")
    if out["noise_structure"] == "positions" and not REGISTRY[out["rule"]].positions_ok:
        raise _err("noise_structure", f"'positions' is not available for rule {out['rule']!r} (it keeps "
                   "the sites' own structure); use noise_structure=locked")
    _check_arch(out)
    if out["run_name"]:
        from .files import safe_name

        safe_name(out["run_name"], "config key 'run_name':")
    return out


def _check_arch(cfg: Mapping[str, Any]) -> None:
    """Refuse, when the config is read, what its architecture cannot run:
    a key another architecture reads, set away from its default (it would be
    silently ignored), and whatever the architecture's own ``check`` refuses."""
    arch = get_arch(cfg["arch"])
    for other in ARCHS:
        if other == arch.name:
            continue
        for key in get_arch(other).keys:
            if key not in arch.keys and cfg[key] != DEFAULTS[key]:
                named = [n for n, c in CONFIGS.items() if c.get("arch", DEFAULTS["arch"]) == arch.name]
                hint = f"; start from a config of arch {arch.name!r} ({', '.join(named)})" if named else ""
                raise _err(key, f"is read by arch {other!r} only, not by arch {arch.name!r} "
                           f"(got {cfg[key]!r}, default {DEFAULTS[key]!r}){hint}")
    why = arch.check(cfg)
    if why:
        raise DropcheckError(f"arch {arch.name!r} refuses this config (rule {cfg['rule']!r}): {why}")


def load_config_source(name_or_file: str) -> tuple[str, dict[str, Any]]:
    """``(config name, its keys over DEFAULTS)`` for a named config or a JSON file."""
    if name_or_file in CONFIGS:
        return name_or_file, {**DEFAULTS, **CONFIGS[name_or_file]}
    path = Path(name_or_file)
    if not path.exists():
        raise DropcheckError(
            f"unknown config {name_or_file!r}: not a named config ({', '.join(CONFIGS)}) nor an existing file"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DropcheckError(f"config file {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DropcheckError(f"config file {path}: expected a JSON object of keys, got {type(obj).__name__}")
    base = obj.pop("base", None)
    cfg = dict(DEFAULTS)
    if base is not None:
        if base not in CONFIGS:
            raise DropcheckError(f"config file {path}: unknown base config {base!r}; expected one of {list(CONFIGS)}")
        cfg.update(CONFIGS[base])
    for key, value in obj.items():
        try:
            cfg[key] = _coerce(key, value)
        except DropcheckError as exc:
            raise DropcheckError(f"config file {path}: {exc}") from None
    return path.stem, cfg


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: typed value}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise DropcheckError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        out[key] = parse_value(key, text)
    return out


def get_config(name_or_file: str, overrides: Iterable[str] | Mapping[str, Any] = ()) -> tuple[str, dict[str, Any]]:
    """``(config name, validated config)``."""
    name, cfg = load_config_source(name_or_file)
    if isinstance(overrides, Mapping):
        over = {k: _coerce(k, v) for k, v in overrides.items()}
    else:
        over = parse_overrides(overrides)
    cfg.update(over)
    return name, validate(cfg)


def make_config(base: str = "smoke", **overrides: Any) -> dict[str, Any]:
    """A validated config from a named one and Python overrides (tests, scripts)."""
    return get_config(base, overrides)[1]


def run_name(config_name: str, cfg: Mapping[str, Any]) -> str:
    if cfg["run_name"]:
        return cfg["run_name"]
    rule = cfg["rule"]
    k = f"-k{cfg['k']}" if REGISTRY[rule].takes_k else ""
    return f"{config_name}-{rule}{k}-s{cfg['seed']}"
