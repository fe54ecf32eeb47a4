"""The active analytic sessions, at the bottom of the package's layers.

``analytic_mode`` (``_analytic.py``) pushes its ``AnalyticSession`` here;
the modules below it that must know whether a pass is analytic read it
here: ``_common.call_model`` (run the pass through the session's checks),
``_functional`` (a ``with_drop_probability`` copy's own passes apply its
per-site drop probabilities unless an analytic pass covers them).  This
module imports nothing of dropcheck's, so every other one can import it at
top level and the package's import graph has no cycle.
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

from torch import nn

# the innermost active session (an ``_analytic.AnalyticSession``, a class this module does not import, hence
# the ``Any`` below); each session keeps the one it was entered in as ``_parent``
PASS: contextvars.ContextVar = contextvars.ContextVar("dropcheck_session", default=None)


def current_session(model: nn.Module) -> Optional[Any]:  # an _analytic.AnalyticSession
    """The innermost active session of ``model`` (``None`` outside ``analytic_mode``)."""
    s = PASS.get()
    while s is not None and s.model is not model:
        s = getattr(s, "_parent", None)
    return s


def session_covering(module: nn.Module) -> Optional[Any]:  # an _analytic.AnalyticSession
    """An active analytic session whose model contains ``module`` (itself or
    as a submodule), or ``None``."""
    s = PASS.get()
    while s is not None:
        if s.model is module or id(module) in s.module_names():
            return s
        s = getattr(s, "_parent", None)
    return None


def functional_override(model: nn.Module, name: str, q: float) -> float:
    """The drop probability of functional site ``name`` of ``model``: the one
    ``with_drop_probability`` set (by name, or for every functional site) on
    ``model`` or on the submodule of ``model`` on the site's path that
    carries a table (a ``with_drop_probability`` copy wrapped in another
    module; its table names sites relative to itself), else the call's own
    ``q``."""
    path = name.split(":", 1)[0]
    parts = [] if path == "<root>" else path.split(".")
    for i in range(len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            sub = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            break
        table = sub.__dict__.get("_dropcheck_q")
        if table:
            rel = name[len(prefix) + 1:] if prefix else name
            if rel.startswith(":"):
                rel = "<root>" + rel
            return table.get(rel, table.get("*", q))
    return q
