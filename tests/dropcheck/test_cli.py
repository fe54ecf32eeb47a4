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


USER_MODELS = '''
import sys, torch
from torch import nn
import torch.nn.functional as F
sys.path.insert(0, {zoo!r})
import model_zoo as Z


def boom():
    raise RuntimeError("no data here")


def float32_inputs():
    m = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 2)).double()
    return m, torch.randn(2, 3), torch.tensor([0, 1])


def float64_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 4)).double()
    return m, torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])


def encoder_train_mode():
    z = Z.encoder_layer()
    z.model.train()
    return z.model, z.inputs, z.targets


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.drop, self.bn, self.head = nn.Dropout2d(0.2), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.c1(x))))
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


def cnn():
    torch.manual_seed(0)
    return Conv().double().train(), torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    from pathlib import Path

    zoo = str(Path(__file__).resolve().parent)
    (tmp_path / "usermodels.py").write_text(USER_MODELS.format(zoo=zoo))
    monkeypatch.chdir(tmp_path)


def test_verify_factory_that_raises_is_an_error_without_traceback(user_models, capsys):
    assert main(["verify", "--model", "usermodels.py:boom"]) == 2
    err = capsys.readouterr().err
    assert "boom() raised RuntimeError: no data here" in err and "Traceback" not in err


def test_verify_model_that_cannot_run_is_a_failed_row(user_models, capsys):
    assert main(["verify", "--json", "--model", "usermodels.py:float32_inputs"]) == 1
    rows = json.loads(capsys.readouterr().out)["checks"]
    assert [r["status"] for r in rows] == ["FAIL"] and "dtype torch.float32" in rows[0]["note"]


def test_verify_train_mode_attention_model_passes(user_models, capsys):
    """nn.TransformerEncoderLayer + MultiheadAttention, left in train mode:
    attention dropout through F.dropout and SDPA, double backward included."""
    rc = main(["verify", "--json", "--model", "usermodels.py:encoder_train_mode", "--draws", "40"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, [r for r in out["checks"] if r["status"] == "FAIL"]
    assert out["summary"]["passed"] >= 6


def test_verify_cnn_guards_dense_references_by_size(user_models, capsys):
    """numel(h) = 8·8·16·16 = 16384: the dense O(numel²) references (16 GiB
    as float64 for the Hessian) are skipped with their size, the rest runs."""
    rc = main(["verify", "--json", "--model", "usermodels.py:cnn", "--draws", "20"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, [r for r in out["checks"] if r["status"] == "FAIL"]
    skipped = {r["quantity"]: r["note"] for r in out["checks"] if r["status"] == "skip"}
    assert "numel(h)=16384" in skipped["R_approx (weighted, per site)"]


def test_taylor_map_of_several_user_models_in_one_table(user_models, capsys, tmp_path):
    rc = main(["taylor-map", "--model", "usermodels.py:float64_mlp", "usermodels.py:cnn", "--qs", "0.2",
               "--samples", "20", "--no-limit", "--estimator", "hutchinson", "--estimator-samples", "20",
               "--out", str(tmp_path / "map")])
    assert rc == 0
    rows = json.loads((tmp_path / "map" / "taylor_map.json").read_text())["rows"]
    assert [(r["model"], r["noise"]) for r in rows] == [
        (m, n) for m in ("usermodels.py:float64_mlp", "usermodels.py:cnn") for n in ("bernoulli", "gaussian")]
    assert all(r["estimator"] == "hutchinson" and r["R_drop"] != 0 for r in rows)
