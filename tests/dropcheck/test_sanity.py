"""Inputs that used to give a silently wrong or misleading number (issue 30):
a finite-difference step the dtype cannot resolve, counts too small to
estimate anything, logits whose squares overflow, and a raising model
factory; each is now one clear ``DropcheckError``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropcheck as dc
from dropcheck.cli import main


def _mlp(dtype, scale=1.0):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        m[3].weight.mul_(scale)
    return m, torch.randn(5, 4, dtype=dtype), torch.randint(0, 3, (5,))


ROUTES = {
    "explicit fd": lambda m, X, y, eps: dc.explicit_regularizer(m, X, y, estimator="fd", eps=eps, generator=0),
    "implicit fd": lambda m, X, y, eps: dc.implicit_noise(m, X, y, estimator="fd", eps=eps, generator=0),
    "shared probe": lambda m, X, y, eps: dc.analytic_dropout_objective(m, X, y, eps=eps, generator=0),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_an_fd_step_below_the_dtypes_resolution_is_refused(route):
    """At ``eps`` below float32's machine epsilon ``1 ± eps`` rounds to 1:
    both probe passes are the clean pass and the difference is exactly zero."""
    m, X, y = _mlp(torch.float32)
    with pytest.raises(dc.DropcheckError, match="below what torch.float32 resolves"):
        ROUTES[route](m, X, y, 1e-9)
    m64, X64, y64 = _mlp(torch.float64)
    ROUTES[route](m64, X64, y64, 1e-9)  # float64 resolves it (machine epsilon 2.2e-16)


def test_logits_whose_squares_overflow_raise_the_librarys_error():
    m, X, y = _mlp(torch.float32, scale=1e36)  # finite float32 logits near 1e35
    assert torch.isfinite(m(X)).all()
    for est in ("exact", "hutchinson", "fd"):
        with pytest.raises(dc.DropcheckError, match="beyond what torch.float32 can square"):
            dc.explicit_regularizer(m, X, y, estimator=est, generator=0)


@pytest.mark.parametrize("draws", ["0", "1", "-5"])
def test_verify_refuses_too_few_draws(draws, capsys):
    assert main(["verify", "--cases", "softmax-regression", "--no-symbolic", "--draws", draws]) == 2
    err = capsys.readouterr().err
    assert "--draws must be >= 2" in err and "FAIL" not in err


def test_taylor_map_refuses_too_few_estimator_samples(capsys, tmp_path):
    rc = main(["taylor-map", "--widths", "4", "--qs", "0.2", "--samples", "20", "--no-limit", "--estimator",
               "hutchinson", "--estimator-samples", "0", "--out", str(tmp_path)])
    assert rc == 2 and "--estimator-samples must be >= 10" in capsys.readouterr().err


def test_taylor_map_with_a_raising_factory_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "boomers.py").write_text("def boom():\n    raise RuntimeError('no data here')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["taylor-map", "--model", "boomers.py:boom", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "boom() raised RuntimeError: no data here" in err and "Traceback" not in err


@pytest.mark.parametrize("generator", ["x", 1.5, True, 2**70, [1]])
def test_a_generator_that_is_not_a_generator_or_an_integer_seed_is_refused(generator):
    m, X, y = _mlp(torch.float64)
    with pytest.raises(dc.DropcheckError, match="generator must be a torch.Generator, an integer seed"):
        dc.explicit_regularizer(m, X, y, estimator="sampled", generator=generator)


def test_verify_checks_a_float32_model_on_a_float64_copy(tmp_path, monkeypatch, capsys):
    """The tolerances are float64 ones: a float32 model's routes agree to 1e-7
    (its rounding), which gave 5 FAIL rows of a correct computation."""
    (tmp_path / "f32models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))\n"
        "    return m, torch.randn(5, 4), torch.randint(0, 3, (5,))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["verify", "--model", "f32models.py:make", "--draws", "100"]) == 0
    out, err = capsys.readouterr()
    assert "user model (float32, checked on a float64 copy)" in err and "FAIL" not in out
