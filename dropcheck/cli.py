"""The ``dropcheck`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; only the module of the chosen subcommand is
imported, so the math modules never import ``training/`` or
``derivations/`` (docs/design.md): this front end is the one place that
dispatches to them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._errors import DropcheckError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("dropcheck._cli_verify", "cross-check every regularizer by independent routes"),
    "taylor-map": ("dropcheck._cli_taylor_map", "where the second-order picture of dropout holds"),
    "bound": ("training.studies.bound_runs", "Theorem 4.1 terms along training of linear models"),
    "train": ("training.cli", "language-model experiments (update rules of the paper)"),
    "bench": ("training.studies.bench", "time every update rule side by side"),
    "reproduce": ("training.studies.reproduce", "run a study plan (claims C1-C6) to the end, then draw its results"),
    "figures": ("paper_figures.cli", "draw the paper's figures and tables from run logs"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dropcheck",
        description="Verified analytic dropout regularizers (Wei, Kakade & Ma, ICML 2020).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints the usage error (or --help) and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dropcheck {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except DropcheckError as exc:
        print(f"dropcheck {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or missing folder, a file where a folder should be
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dropcheck {name}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
