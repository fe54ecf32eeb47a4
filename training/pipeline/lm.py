"""The language-model contract of ``training/``, and the registry of architectures.

Every model the pipeline trains (trainer, rules, bench, evaluation) is a
``LanguageModel``: an ``nn.Module`` with

- ``init_state(batch_size)``: the state a batch of ``batch_size`` sequences
  starts from (a pytree of tensors whose leaves have the batch on some axis:
  the LSTM's ``[(h, c)]`` per layer; ``()`` for a model without state);
- ``forward(tokens, state) -> (logits, new_state)``: one segment, ``tokens``
  of shape ``(T, B)`` (time first, as the batchified streams), ``logits`` of
  shape ``(T, B, V)``; ``state=None`` starts from ``init_state``;
- ``decoder``: the trailing ``nn.Linear`` that makes the logits from the
  features, or ``None``.  The fast finite-difference routes stop their
  perturbed passes at its input (``u = W(f⁺ − f⁻)/2ε``; ``dc.
  analytic_dropout_objective(decoder=...)``).

Nothing else belongs in it.  (One optional extra: a model *with* state that
wants ``estimator=fd_mid`` provides ``record_states()``, the states of the
perturbed passes, which stop at the decoder; without it ``fd_mid`` is refused
for that model and ``fd_shared`` works.)  A model does not say where its
dropout is: the sites, their drop probability ``q`` and ``λ(q)`` come from
dropcheck's core (``dc.find_sites(model, tokens)``), whatever kind of
dropout the model uses (modules, ``F.dropout``, attention dropout).

An architecture is one module that defines ``ARCH = Arch(...)``: how to
build the model from a config, which config keys it reads, the names of
its site *groups* (the per-group coefficients ``explicit_mult_<g>`` and
``implicit_mult_<g>`` of the rules) and how a site the core found maps to
a group, and which configs it refuses.  ``ARCHS`` below maps the config
value ``arch`` to that module; adding an architecture is one new module and
one line here (docs/design.md, "Adding an architecture").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

from dropcheck import DropcheckError, SiteSpec

__all__ = ["LanguageModel", "StatefulLM", "Arch", "ARCHS", "get_arch", "detach_state", "state_to",
           "all_groups"]

State = Any  # a pytree of tensors


class LanguageModel(nn.Module):
    """The contract (module docstring).  Subclasses set ``self.decoder`` in
    ``__init__`` (an ``nn.Linear``, or ``None``) and implement ``init_state``
    and ``forward``.  (No class-level default: ``nn.Module`` keeps submodules
    in ``_modules``, which a class attribute of the same name would hide.)"""

    decoder: Optional[nn.Linear]

    def init_state(self, batch_size: int) -> State:
        """The state a batch of ``batch_size`` sequences starts from."""
        return ()

    def forward(self, tokens: torch.Tensor, state: State = None):  # pragma: no cover - abstract
        """``(T, B)`` tokens -> ``((T, B, V) logits, new state)``."""
        raise NotImplementedError


class StatefulLM(nn.Module):
    """``model(tokens) -> logits`` for dropcheck's API: holds the incoming
    state (``.hidden``, set by the trainer before each step; ``None`` means
    ``init_state``) and never changes it, so every forward pass of one step
    (k dropout draws, probes, finite differences) starts from the same state.
    """

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.lm = lm
        self.hidden: Optional[State] = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens, self.hidden)[0]


def detach_state(state: State) -> State:
    """The state with every tensor detached (carried to the next segment)."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)


def state_to(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """``fn`` applied to every tensor of the state (copies to the CPU, moves to a device)."""
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, state)


@dataclass(frozen=True)
class Arch:
    """One architecture of the registry.

    ``build(cfg, vocab)``: the ``LanguageModel`` (on the CPU, default dtype;
    the trainer seeds torch's RNG before and moves it after).
    ``groups``: the names of its site groups.  ``site_group(spec, lm)``: the
    group of a site the core found (``dc.SiteSpec``: its module, structure,
    whether it is functional), never from an attribute name.
    ``keys``: the config keys only this architecture reads (another
    architecture's config must leave them at their defaults).
    ``check(cfg)``: a reason to refuse the config (a rule or an option that
    cannot run on this architecture), or ``None``.
    """

    name: str
    build: Callable[[Mapping[str, Any], int], LanguageModel]
    groups: tuple[str, ...]
    site_group: Callable[[SiteSpec, nn.Module], str]
    keys: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any]], Optional[str]] = field(default=lambda cfg: None)
    summary: str = ""


# config value ``arch`` -> the module that defines ``ARCH``
ARCHS: dict[str, str] = {
    "awd-lstm": "training.models.awd_lstm",
    "gpt2": "training.models.gpt2",
}


def get_arch(name: str) -> Arch:
    """The registered architecture ``name`` (its module is imported on first use)."""
    if name not in ARCHS:
        raise DropcheckError(f"config key 'arch': expected one of {list(ARCHS)}, got {name!r}")
    mod = importlib.import_module(ARCHS[name])
    arch = getattr(mod, "ARCH", None)
    if not isinstance(arch, Arch) or arch.name != name:
        raise DropcheckError(f"module {ARCHS[name]} does not define ARCH = Arch({name!r}, ...)")
    return arch


def all_groups() -> tuple[str, ...]:
    """Every group name of every registered architecture, in registry order."""
    out: dict[str, None] = {}
    for name in ARCHS:
        out.update(dict.fromkeys(get_arch(name).groups))
    return tuple(out)
