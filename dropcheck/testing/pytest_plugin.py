"""pytest plugin of ``dropcheck.testing`` (registered through the
``pytest11`` entry point, so it is active wherever dropcheck is installed).

- the ``heavy`` marker: long Monte Carlo checks.  They are skipped unless
  the run asks for them: ``pytest --heavy`` (also ``--dropcheck-heavy``, the
  only name if another plugin owns ``--heavy``; or ``DROPCHECK_HEAVY=1``), or a
  ``-m`` expression that mentions ``heavy`` (``-m heavy``; a suite whose
  own ``addopts`` say ``-m 'not heavy'`` keeps its own selection).
- ``--heavy`` also sets ``DROPCHECK_HEAVY=1``, which
  ``dropcheck.testing.hypothesis_settings()`` reads (100 examples, not 10).
- the ``dropcheck_seed`` fixture: an int seed (``--dropcheck-seed``,
  default 0) for ``generator=`` arguments.

The module itself uses only pytest, but importing it imports the
``dropcheck`` package (and so torch) when pytest starts, in every project of
an environment where dropcheck is installed; ``-p no:dropcheck`` turns the
plugin off.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("dropcheck")
    kw = dict(action="store_true", default=False, dest="dropcheck_heavy",
              help="run tests marked heavy (long Monte Carlo checks); sets DROPCHECK_HEAVY=1")
    try:
        group.addoption("--heavy", "--dropcheck-heavy", **kw)
    except ValueError:  # another plugin owns --heavy: keep ours under its long name
        group.addoption("--dropcheck-heavy", **kw)
    group.addoption("--dropcheck-seed", type=int, default=0, help="seed of the dropcheck_seed fixture (default 0)")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: long Monte Carlo / statistical checks (run with --heavy or -m heavy)")
    if config.getoption("dropcheck_heavy"):
        os.environ["DROPCHECK_HEAVY"] = "1"


def _heavy_requested(config) -> bool:
    if config.getoption("dropcheck_heavy") or os.environ.get("DROPCHECK_HEAVY", "") not in ("", "0"):
        return True
    return "heavy" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config, items):
    if _heavy_requested(config):
        return
    skip = pytest.mark.skip(reason="heavy: run with --heavy (or -m heavy)")
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(skip)


@pytest.fixture
def dropcheck_seed(request) -> int:
    """An int seed for ``generator=`` arguments (``--dropcheck-seed``)."""
    return int(request.config.getoption("--dropcheck-seed"))


def plugin_args() -> list[str]:
    """The pytest arguments that load this plugin in a subprocess: none when the
    installed package registers it (entry point ``pytest11``; a second ``-p``
    would be refused as already registered), else ``-p dropcheck.testing.pytest_plugin``."""
    from importlib.metadata import entry_points

    if any(ep.value == __name__ for ep in entry_points(group="pytest11")):
        return []
    return ["-p", __name__]
