"""The command line: `dropcheck verify` and `dropcheck taylor-map`."""

from __future__ import annotations

import json

import pytest

from dropcheck import _sites
from dropcheck.cli import main


def test_verify_json_is_valid_and_passes(capsys):
    rc = main(["verify", "--json", "--cases", "softmax-regression", "locked-rnn", "--draws", "60", "--no-symbolic"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["summary"]["failed"] == 0
    assert out["summary"]["passed"] == len([c for c in out["checks"] if c["status"] == "pass"]) > 10
    quantities = {c["quantity"] for c in out["checks"]}
    assert "R_taylor = weighted R_approx (only softmax after sites)" in quantities
    assert "lim R_drop/q = sum Delta_ik" in quantities


def test_verify_fails_with_exit_1_when_lambda_is_doubled(capsys, monkeypatch):
    # Mutation: the site weight λ off by a factor 2 must be caught by the dense route,
    # whose constant ½E[η²] is computed from the noise law, not from SiteSpec.lam.
    monkeypatch.setattr(_sites.SiteSpec, "lam", property(lambda s: s.q / (1.0 - s.q)))
    rc = main(["verify", "--json", "--cases", "mlp-tanh", "--draws", "30", "--no-symbolic"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    failed = {c["quantity"] for c in out["checks"] if c["status"] == "FAIL"}
    assert "R_approx (weighted, per site)" in failed


def test_verify_table_and_user_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "usernet.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 2)).double()\n"
        "    return m, torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])\n"
    )
    monkeypatch.chdir(tmp_path)
    rc = main(["verify", "--model", "usernet.py:make", "--draws", "40"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "route A" in text and "passed" in text


@pytest.mark.parametrize("spec, msg", [
    ("no_such_module_xyz:make", "cannot import"),
    ("nocolon", "MODULE:FACTORY"),
    ("./missing_file.py:make", "no file"),
])
def test_verify_bad_model_spec(spec, msg, capsys):
    assert main(["verify", "--model", spec]) == 2
    assert msg in capsys.readouterr().err


def test_taylor_map_writes_table_data_and_figure(tmp_path, capsys):
    rc = main(["taylor-map", "--widths", "4", "16", "--qs", "0.05", "0.3", "--samples", "50", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "taylor_map.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2  # widths × qs × noises
    assert (tmp_path / "taylor_map.png").stat().st_size > 10_000
    assert (tmp_path / "taylor_map.csv").read_text().startswith("model,width,q,noise")
    for r in rows:
        # R_taylor and λR_approx scale with λ(q) = q/(2(1-q)) exactly
        assert r["R_taylor"] / r["R_approx_weighted"] == pytest.approx(
            rows[0]["R_taylor"] / rows[0]["R_approx_weighted"]) or r["width"] != rows[0]["width"]


def test_taylor_map_rejects_bad_q(tmp_path, capsys):
    assert main(["taylor-map", "--qs", "1.5", "--out", str(tmp_path)]) == 2
    assert "--qs" in capsys.readouterr().err


def test_taylor_map_hutchinson_agrees_with_exact():
    # the scalable path estimates λR_approx and R_taylor by probes; it must agree
    # with the exact path within its (propagated) standard error (|z| < 4.5)
    from dropcheck._taylor_map import map_model, tanh_family

    model, X, y = tanh_family(8, seed=1)
    ex = map_model("t", model, X, y, [0.2], samples=50, noises=("gaussian",), limit=False)[0]
    hu = map_model("t", model, X, y, [0.2], samples=50, noises=("gaussian",), limit=False,
                   estimator="hutchinson", estimator_samples=400)[0]
    assert hu.R_drop == ex.R_drop  # same seed, same Monte Carlo draws
    assert ex.R_approx_stderr == ex.R_taylor_stderr == 0.0
    assert hu.R_approx_stderr > 0 and hu.R_taylor_stderr > 0
    assert abs(hu.R_approx_weighted - ex.R_approx_weighted) <= 4.5 * hu.R_approx_stderr
    assert abs(hu.R_taylor - ex.R_taylor) <= 4.5 * hu.R_taylor_stderr
    # probe noise is propagated into the ratio's relative standard error
    assert hu.ratio_approx_stderr / hu.ratio_approx > ex.ratio_approx_stderr / ex.ratio_approx
