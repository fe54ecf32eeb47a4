"""The tiny AWD-LSTM, batch and helpers shared by the update-rule tests
(``tests/training`` is on pytest's pythonpath)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.pipeline.configs import make_config
from training.models.awd_lstm import AWDLSTM, StatefulLM
from training.pipeline.rules import Gens, make_rule, sites_off

V = 11
Q = dict(q_embedding=0.3, q_hidden=0.2, q_output=0.4, q_weights=0.25, q_rows=0.1)
X = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(2))


def _setup(rule, backend="loop", **over):
    cfg = make_config("smoke", rule=rule, dtype="float64", **{**Q, **over})
    torch.manual_seed(0)
    lm = AWDLSTM(V, 5, 6, 2, backend=backend, **{k: cfg[k] for k in Q}).double()
    model = StatefulLM(lm)
    g = torch.Generator().manual_seed(7)
    model.hidden = [
        (0.2 * torch.randn(3, r.n_out, generator=g, dtype=torch.float64),
         0.2 * torch.randn(3, r.n_out, generator=g, dtype=torch.float64))
        for r in lm.rnns
    ]
    return cfg, model, make_rule(cfg, model)


def _gens(seed=5):
    g = torch.Generator().manual_seed(seed)
    return Gens(g, g)


def _clean_loss(model):
    with sites_off(model):
        return F.cross_entropy(model(X).reshape(-1, V), Y.reshape(-1))


def _grad(model, scalar):
    named = list(model.named_parameters())
    gs = torch.autograd.grad(scalar, [p for _, p in named])
    return {n: g for (n, _), g in zip(named, gs)}


def _train_briefly(model, rule, steps: int = 8, seed: int = 11):
    """``steps`` clipped SGD steps with ``rule`` from a zero state: the clean
    loss ``(before, after)``."""
    model.hidden = None
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gens = _gens(seed)
    before = _clean_loss(model).item()
    for _ in range(steps):
        g, _ = rule.gradient(model, X, Y, gens)
        for n, p in model.named_parameters():
            p.grad = g[n]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return before, _clean_loss(model).item()
