"""``python -m derivations emit --out FILE.json [--cases default|SPECS.json]``.

Writes the reference file whose schema is documented in :mod:`derivations`
(atomically: temp file + rename).  ``--cases default`` is
:func:`derivations.defaults.default_specs`; otherwise a JSON file holding a
list of specs (or ``{"specs": [...]}``).  ``--no-expressions`` leaves the
formulas out; ``--jobs N`` derives cases in ``N`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import sympy as sp

from .cases import RATIO_QS, SpecError, build_case
from .defaults import default_specs

__all__ = ["SCHEMA_VERSION", "load_specs", "emit", "main"]

SCHEMA_VERSION = 1


def load_specs(which: str) -> list:
    """``"default"`` or the path of a JSON list of specs."""
    if which == "default":
        return default_specs()
    path = Path(which)
    if not path.is_file():
        raise SpecError(f"--cases must be 'default' or a JSON file of specs; {which!r} is neither")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{which}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "specs" in data:
        data = data["specs"]
    if isinstance(data, dict) and "cases" in data:  # a reference file: re-derive its specs
        data = [c["spec"] for c in data["cases"]]
    if not isinstance(data, list) or not data:
        raise SpecError(f"{which}: expected a non-empty list of specs")
    return data


def _build(args):
    spec, with_expressions = args
    return build_case(spec, with_expressions=with_expressions)


def emit(specs: list, *, with_expressions: bool = True, jobs: int = 1) -> dict:
    """Build every case; returns the whole reference document."""
    t0 = time.perf_counter()
    work = [(s, with_expressions) for s in specs]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            cases = list(pool.map(_build, work))
    else:
        cases = [_build(w) for w in work]
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": "derivations (SymPy; independent of dropcheck)",
        "versions": {"python": platform.python_version(), "sympy": sp.__version__, "numpy": np.__version__},
        "ratio_qs": list(RATIO_QS),
        "total_seconds": time.perf_counter() - t0,
        "cases": cases,
    }


def write_json(doc: dict, out: Path) -> None:
    """Atomic write; floats as ``repr`` (``json`` does that), no NaN/inf."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m derivations", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("emit", help="write symbolic reference values as JSON")
    e.add_argument("--out", required=True, help="output JSON file")
    e.add_argument("--cases", default="default", help="'default' or a JSON file with a list of specs")
    e.add_argument("--no-expressions", action="store_true", help="leave the formulas out")
    e.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    args = p.parse_args(argv)
    try:
        specs = load_specs(args.cases)
        t0 = time.perf_counter()
        doc = emit(specs, with_expressions=not args.no_expressions, jobs=max(1, args.jobs))
        write_json(doc, Path(args.out))
    except SpecError as exc:
        print(f"derivations emit: error: {exc}", file=sys.stderr)
        return 2
    for c in doc["cases"]:
        r = c["gap_taylor_ratio"]
        ratios = ", ".join(f"q={k}: {v['ratio']:.4f}" for k, v in r.items() if v["ratio"] is not None)
        print(
            f"{c['name'] or '(unnamed)':30s} derive {c['timing']['derive_seconds']:5.2f}s  "
            f"eval {c['timing']['evaluate_seconds']:6.3f}s  case {c['timing']['total_seconds']:5.2f}s  "
            f"{c['size']['json_bytes']:6d} B  "
            f"units {c['size']['units']}  R_drop/R_taylor {ratios}"
        )
    print(f"wrote {len(doc['cases'])} cases to {args.out} in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
