"""``dropcheck verify``: cross-check every quantity by two independent routes.

Runs the built-in cases (no data, no GPU) or a user's model given as
``--model module:factory`` (or ``path/to/file.py:factory``), where
``factory()`` returns ``(model, inputs, targets)``: ``model(inputs)`` gives
logits with classes on the last axis, ``targets`` are class indices.  Prints
a table (quantity, route A vs route B, error, tolerance, status), or JSON
with ``--json``; exits 1 if any check fails.

The tolerances are float64 ones (the routes agree to rounding, 1e-9 or
better; finite differences at their float64 step): a model in another dtype
is checked on a float64 copy (model and floating inputs cast), and the case's
description says so.  What is verified is the mathematics on the model's
architecture; float32 rounding would only hide it behind 1e-7 noise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from ._cases import CASES, Case, builtin_cases
from ._errors import DropcheckError
from ._verify import format_table, run_case, summarize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="check a user model: FACTORY() returns (model, inputs, targets)")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), help="built-in cases to run (default: all)")
    p.add_argument("--draws", type=int, default=300, help="Monte Carlo draws per statistical check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-symbolic", action="store_true", help="skip the SymPy route")


def load_factory(spec: str):
    """Import ``module:factory`` or ``file.py:factory`` and return the callable."""
    if ":" not in spec:
        raise DropcheckError(f"--model expects MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise DropcheckError(f"--model: no file {path}")
            s = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except DropcheckError:
        raise
    except Exception as exc:
        raise DropcheckError(f"--model: cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DropcheckError(f"--model: {mod_name!r} has no callable {attr!r}")
    return factory


def user_case(spec: str) -> Case:
    factory = load_factory(spec)
    try:
        out = factory()
    except DropcheckError:
        raise
    except Exception as exc:  # the user's code failed: say where, without a traceback
        raise DropcheckError(f"--model: {spec}() raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise DropcheckError(f"--model: {spec} must return (model, inputs, targets), got {type(out).__name__}")
    model, inputs, targets = out
    model, inputs, was = _in_float64(model, inputs)
    return Case(spec, "user model" + (f" ({was}, checked on a float64 copy)" if was else ""), model, inputs,
                targets)


def _in_float64(model, inputs):
    """``(model, inputs, None)`` for a float64 model, else a float64 copy of
    both and the dtype(s) the model had (module docstring)."""
    import copy

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    if not tensors or dtypes == ["float64"]:
        return model, inputs, None
    try:
        model64 = copy.deepcopy(model).double()
    except Exception as exc:  # not copyable: checked as it is, against float64 tolerances
        print(f"warning: --model: cannot make a float64 copy ({type(exc).__name__}: {exc}); checking the "
              f"{'/'.join(dtypes)} model against float64 tolerances", file=sys.stderr)
        return model, inputs, None
    cast = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    inputs64 = type(inputs)(cast(t) for t in inputs) if isinstance(inputs, (tuple, list)) else cast(inputs)
    return model64, inputs64, "/".join(dtypes)


def symbolic_route():
    """``spec -> {R_approx_weighted, R_taylor, R_drop_exact}`` from the SymPy
    derivations (an independent package), or ``None`` if unavailable."""
    try:
        import derivations
    except Exception:
        return None
    build = getattr(derivations, "build_case", None)
    if build is None:
        return None

    def values(spec: dict) -> dict:
        ref = build(spec, with_expressions=False)["reference"]
        return {
            "R_approx_weighted": float(ref["R_approx"]["weighted"]["total"]),
            "R_taylor": float(ref["R_taylor"]),
            "R_drop_exact": float(ref["R_drop_exact"]),
            "first_order": float(ref["first_order_coefficient"]),
        }

    return values


def run(args) -> int:
    # tiny models: intra-op threads only add contention (80x slower on a loaded 2-core machine)
    torch.set_num_threads(1)
    if args.draws < 2:
        raise DropcheckError(f"--draws must be >= 2 (a standard error needs two draws), got {args.draws}")
    t0 = time.perf_counter()
    cases = [user_case(args.model)] if args.model else builtin_cases(args.cases)
    symbolic = None if args.no_symbolic or args.model else symbolic_route()
    rows = []
    for case in cases:
        if not args.json:
            print(f"[{case.name}] {case.description}", file=sys.stderr, flush=True)
        rows += run_case(case, draws=args.draws, seed=args.seed, symbolic=symbolic)
    summary = summarize(rows)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["symbolic_route"] = symbolic is not None
    if args.json:
        print(json.dumps({"summary": summary, "checks": [r.as_dict() for r in rows]}, indent=1))
    else:
        print(format_table(rows))
        print(f"\n{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
              f"in {summary['seconds']:.1f}s" + ("" if symbolic else " (symbolic route not available)"))
    return 1 if summary["failed"] else 0
