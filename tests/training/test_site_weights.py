"""Per-group coefficients through dropcheck's ``site_weights`` (rules.py): a
multiplier of 0 removes its sites from the call (no probe drawn), and an
all-zero explicit weight leaves the clean loss."""

from __future__ import annotations

import torch

import dropcheck as dc
from training.pipeline.configs import make_config
from training.models.awd_lstm import AWDLSTM, StatefulLM
from training.pipeline.rules import Gens, make_rule

V = 11
Q = dict(q_embedding=0.3, q_hidden=0.2, q_output=0.4, q_weights=0.25, q_rows=0.1)
X = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(2))


def _setup(**over):
    cfg = make_config("smoke", dtype="float64", **{**Q, **over})
    torch.manual_seed(0)
    model = StatefulLM(AWDLSTM(V, 5, 6, 2, backend="loop", **{k: cfg[k] for k in Q}).double())
    return cfg, model, make_rule(cfg, model)


def _gens(seed=5):
    g = torch.Generator().manual_seed(seed)
    return Gens(g, g)


def test_fd_zero_group_draws_no_probe_and_weights_scale_the_rest():
    cfg, model, rule = _setup(rule="explicit", estimator="fd", explicit_mult_rows=0.0, explicit_mult_hidden=3.0)
    R, _ = rule.explicit_term(model, X, Y, _gens())
    rows = dict(model.named_modules())["lm.drop_rows"]
    assert rows.p == 0.1  # restored
    rows.p = 0.0  # the same model without row dropout: same probes for the others
    ref = dc.explicit_regularizer(model, X, Y, estimator="fd", site_weights={"lm.drop_hidden.0": 3.0},
                                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(R, ref)


def test_fd_all_weights_zero_is_the_clean_loss():
    cfg, model, rule = _setup(rule="explicit", estimator="fd", explicit_mult=0.0)
    res = rule.objective(model, X, Y, _gens())
    clean, _ = rule.clean(model, X, Y)
    assert float(res.reg["R"]) == 0.0 and torch.equal(res.objective, clean + 0.0)


def test_noise_all_multipliers_zero_is_no_noise():
    cfg, model, rule = _setup(rule="explicit_implicit", implicit_mult=0.0)
    assert rule.noise(model, X, Y, _gens()) is None
