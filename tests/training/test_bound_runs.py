"""``dropcheck bound`` (``training/studies/bound_runs.py``): data loading, training
with the five regularizers, CSV/JSON/figures, and clear errors."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest

from dropcheck import DataError, DropcheckError
from training.studies import bound_runs as _cli_bound

# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def _args(*argv):

    p = argparse.ArgumentParser()
    _cli_bound.add_arguments(p)
    return p.parse_args(list(argv))


def _tiny_npz(path, with_test=True, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 5)) * 2
    y = np.arange(30) % 3
    X = centers[y] + rng.normal(size=(30, 5))
    arrays = {"X": X, "y": y + 1}  # labels 1..3 are remapped to 0..2
    if with_test:
        yt = np.arange(12) % 3
        arrays.update(X_test=centers[yt] + rng.normal(size=(12, 5)), y_test=yt + 1)
    np.savez(path, **arrays)
    return path


def test_cli_runs_end_to_end_on_a_tiny_data_set(tmp_path, capsys):

    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "out"
    rc = _cli_bound.run(_args("--data", str(data), "--out", str(out), "--epochs", "3", "--seed", "1",
                              "--batch-size", "8"))
    assert rc == 0
    for f in ("bound.csv", "bound.json", "bound.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    payload = json.loads((out / "bound.json").read_text())
    assert payload["config"]["classes"] == 3 and payload["config"]["n_train"] == 30
    assert set(payload["final"]) == set(_cli_bound.REGULARIZERS)
    for reg, hist in payload["history"].items():
        assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
        last = hist[-1]
        for k in ("mu", "nu", "weight_norm", "term_mu", "term_nu", "term_third", "zeta", "rhs", "observed_gap"):
            assert math.isfinite(last[k])
        assert last["rhs"] == pytest.approx(last["term_mu"] + last["term_nu"] + last["term_third"] + last["zeta"])
    rows = list(csv.DictReader((out / "bound.csv").open()))
    assert len(rows) == 5 * 4
    assert (out / "bound.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "explicit+implicit" in printed and "q=0.5" in printed

    # same seed, same results
    out2 = tmp_path / "out2"
    _cli_bound.run(_args("--data", str(data), "--out", str(out2), "--epochs", "3", "--seed", "1",
                         "--batch-size", "8", "--no-plot"))
    assert json.loads((out2 / "bound.json").read_text())["history"] == payload["history"]


def test_cli_default_digits_and_csv_data(tmp_path):
    from dropcheck.cli import main

    out = tmp_path / "digits"
    assert main(["bound", "--out", str(out), "--epochs", "1", "--no-plot",
                 "--regularizers", "none,explicit+implicit"]) == 0
    cfg = json.loads((out / "bound.json").read_text())["config"]
    assert (cfg["classes"], cfg["features"], cfg["n_train"] + cfg["n_test"]) == (10, 64, 1797)
    assert cfg["B"] == pytest.approx(2 * math.log(10))

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = (X[:, 0] > 0).astype(int)
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,label\n" + "\n".join(",".join(map(str, [*x, t])) for x, t in zip(X, y)) + "\n")
    Xtr, ytr, Xte, yte, name = _cli_bound.load_data(path, 0.25)
    assert Xtr.shape == (15, 3) and Xte.shape == (5, 3) and set(np.unique(np.r_[ytr, yte])) <= {0, 1}
    np.testing.assert_allclose(Xtr.mean(0), 0, atol=1e-12)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        (b"not a zip", "not a readable .npz"),
        ({"X": np.ones((5, 2))}, "'X' and 'y'"),
        ({"X": np.ones((5, 2)), "y": np.array([0, 1, 0, 1, 0.5])}, "integer class labels"),
        ({"X": np.ones((5, 2)), "y": np.array([0, 1, 0])}, "5 rows but y has 3"),
        ({"X": np.array([[0, np.nan]] * 5), "y": np.array([0, 1, 0, 1, 0])}, "non-finite"),
        ({"X": np.ones((5, 2)), "y": np.zeros(5, int)}, "2 classes"),
        ({"X": np.ones((5, 2)), "y": np.arange(5) % 2, "X_test": np.ones((2, 2))}, "both"),
    ],
)
def test_bad_data_files_give_a_clear_error(tmp_path, content, match):

    path = tmp_path / "d.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    with pytest.raises(DataError, match=match):
        _cli_bound.load_data(path)


def test_bad_csv_and_extension_and_the_cli_exit_code(tmp_path, capsys):
    from dropcheck.cli import main

    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match="line 2"):
        _cli_bound.load_data(p)
    p.write_text("1,2,0\n3,1\n")
    with pytest.raises(DataError, match="different numbers of columns"):
        _cli_bound.load_data(p)
    q = tmp_path / "d.txt"
    q.write_text("1,2,0\n")
    with pytest.raises(DataError, match="unknown format"):
        _cli_bound.load_data(q)
    assert main(["bound", "--data", str(q), "--out", str(tmp_path / "o")]) == 2
    assert "unknown format" in capsys.readouterr().err
    with pytest.raises(DropcheckError, match="regularizer"):
        _cli_bound.run(_args("--regularizers", "none,bogus", "--out", str(tmp_path / "o")))
