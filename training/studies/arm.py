"""One ``Arm`` type for every comparison of update rules.

An arm is a name and the config overrides that make it (``rule`` and its
keys).  A study plan's arm (``study.py``) also names the claim it serves
and whether it runs every seed (``key``); a bench arm (``bench.py``) names
the LSTM backend it is timed on and says in words what it computes.  The
fields one kind does not use keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Arm"]


@dataclass(frozen=True)
class Arm:
    name: str  # a study arm's runs are <plan>-<name>-s<seed>; a bench arm's label in the table and the JSON
    overrides: Mapping[str, Any]  # config keys: "rule" and the rule's own
    claim: str = ""  # study: "C1".."C7", "T2", or "baseline"
    key: bool = False  # study: runs --seeds seeds
    backend: str = ""  # bench: fused | loop (n/a: an architecture without the LSTM's backend key)
    what: str = ""  # bench: what the arm computes, in words

    @property
    def rule(self) -> str:
        """The update rule (config value ``rule``; a key of ``training.pipeline.rules.REGISTRY``)."""
        return str(self.overrides.get("rule", ""))
