"""The committed ``derivations/refs.json`` against a fresh ``build_case`` of the
same specs (a regression in the symbolic route shows) and against the
current dropcheck code (a regression in the torch route shows), plus the
``emit`` command itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import derivations as D
from derivations.emit import SCHEMA_VERSION, main as emit_main




import torch_helpers as T  # noqa: E402  (tests/derivations is on pytest's pythonpath)

REFS = Path(D.__file__).with_name("refs.json")
REGEN = "regenerate with: python -m derivations emit --out derivations/refs.json"


@pytest.fixture(scope="module")
def refs() -> dict:
    assert REFS.is_file(), f"{REFS} is missing; {REGEN}"
    return json.loads(REFS.read_text())


@pytest.fixture(scope="module")
def fresh(refs) -> dict:
    return {c["name"]: D.build_case(c["spec"], with_expressions=False) for c in refs["cases"]}


def _numbers(tree, prefix=""):
    """Flatten nested dicts/lists of numbers into {path: array}."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list) and tree and isinstance(tree[0], (dict,)):
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}[{i}]"))
    elif tree is not None:
        out[prefix] = np.asarray(tree, dtype=np.float64)
    return out


def test_refs_file_is_small_and_current(refs):
    assert REFS.stat().st_size < 1_000_000
    assert refs["schema_version"] == SCHEMA_VERSION
    assert refs["ratio_qs"] == list(D.RATIO_QS)
    specs = D.default_specs()
    assert [c["name"] for c in refs["cases"]] == [s["name"] for s in specs], REGEN
    for c, s in zip(refs["cases"], specs):
        assert c["spec"] == s, f"{c['name']}: the default spec changed; {REGEN}"
    covered = {a for c in refs["cases"] for a in c["shape"]["activations"]}
    assert covered == set(D.ACTIVATIONS)
    assert {c["shape"]["depth"] for c in refs["cases"]} == {1, 2, 3}
    assert any(0 in c["shape"]["site_layers"] for c in refs["cases"])
    assert any(k > 0 for c in refs["cases"] for k in c["shape"]["site_layers"])
    assert {c["shape"]["classes"] for c in refs["cases"]} == {2, 3}
    assert {len(c["spec"]["y"]) for c in refs["cases"]} == {1, 2}


def test_refs_match_a_fresh_symbolic_build(refs, fresh):
    for case in refs["cases"]:
        new = fresh[case["name"]]
        for part in ("reference", "gap_taylor_ratio"):
            old_n, new_n = _numbers(case[part]), _numbers(new[part])
            assert old_n.keys() == new_n.keys(), (case["name"], part)
            for k in old_n:
                err = T.rel_err(old_n[k], new_n[k], atol=1e-15)
                assert err <= 1e-10, f"{case['name']}: {part}.{k} changed by {err:.2e} (relative); {REGEN}"


def test_refs_match_current_dropcheck(refs):
    worst = {}
    for case in refs["cases"]:
        errs = T.disagreements(case["spec"], case)
        for k, v in errs.items():
            worst[k] = max(worst.get(k, 0.0), v)
        bad = {k: v for k, v in errs.items() if not v <= T.RTOL}
        assert not bad, f"{case['name']}: dropcheck disagrees with refs.json (relative): {bad}"


def test_refs_expressions_are_parsable_and_derived(refs):
    q = sp.Symbol("q", positive=True)
    for case in refs["cases"]:
        ex = case["expressions"]
        lam = sp.sympify(ex["lambda_derived"], locals={"q": q})
        assert sp.simplify(lam - q / (2 * (1 - q))) == 0
        assert sp.simplify(sp.sympify(ex["variance"], locals={"q": q}) - q / (1 - q)) == 0
        assert "def _lambdifygenerated" in ex["loss_program_source"]
        c = case["shape"]["classes"]
        z = sp.symbols(f"z_0:{c}")
        H = sp.Matrix(sp.sympify(ex["H_out_in_logits"]))
        p = [sp.exp(zc) / sum(sp.exp(zd) for zd in z) for zc in z]
        assert sp.simplify(H - (sp.diag(*p) - sp.Matrix(p) * sp.Matrix(p).T)) == sp.zeros(c, c)


def test_emit_cli_writes_round_tripping_floats(tmp_path):
    specs = [T.tiny_q_spec(), T.last_linear_spec()]
    src = tmp_path / "specs.json"
    src.write_text(json.dumps(specs))
    out = tmp_path / "out.json"
    assert emit_main(["emit", "--out", str(out), "--cases", str(src)]) == 0
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["cases"]] == ["tiny-q", "last-linear-only"]
    direct = D.build_case(specs[0], with_expressions=False)
    a = _numbers(doc["cases"][0]["reference"])
    b = _numbers(direct["reference"])
    for k in a:  # repr round trip: bit-identical float64
        assert np.array_equal(a[k], b[k]), k
    for c in doc["cases"]:
        t = c["timing"]
        assert t["derive_seconds"] >= 0 and math.isfinite(t["total_seconds"])
        assert c["size"]["json_bytes"] > 0


def test_emit_cli_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"sizes": [2, 2]}]))
    assert emit_main(["emit", "--out", str(tmp_path / "o.json"), "--cases", str(bad)]) == 2
    assert "missing" in capsys.readouterr().err
    assert emit_main(["emit", "--out", str(tmp_path / "o.json"), "--cases", str(tmp_path / "nope.json")]) == 2


@pytest.mark.heavy
def test_default_emit_as_a_command_under_60s(tmp_path):
    out = tmp_path / "refs.json"
    r = subprocess.run(
        [sys.executable, "-m", "derivations", "emit", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["total_seconds"] < 60


def test_derivations_imports_nothing_of_the_project():
    code = (
        "import sys, derivations, derivations.emit\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dropcheck', 'training', 'torch'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
