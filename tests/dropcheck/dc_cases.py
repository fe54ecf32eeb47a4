"""Test models and data: small float64 MLPs, locked-dropout and DropConnect
RNNs, and the fixed edge cases used as ``@example`` by several test files.
Every model is rebuilt from integer seeds."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import dropcheck as dc


DT = torch.float64


ACTS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


SMOOTH_ACTS = ["tanh", "sigmoid", "softplus", "gelu"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def mlp(
    sizes,
    acts,
    sites: dict,
    *,
    seed: int,
    scale: float = 1.0,
    out_scale: Optional[float] = None,
    site_cls=nn.Dropout,
) -> nn.Sequential:
    """``sizes = [d0, ..., c]``; ``acts[k]`` after hidden layer ``k``; ``sites``
    maps the index of the dropped activation (0 = input, k = output of hidden
    layer k) to ``q``.  Weights ``scale · N(0, 1/fan_in)`` (the last layer
    ``out_scale`` instead when given), biases ``0.3 · N(0, 1)``."""
    g = gen(seed)
    layers: list[nn.Module] = []
    n_lin = len(sizes) - 1
    for k in range(n_lin):
        if sites.get(k, 0) > 0:
            layers.append(site_cls(sites[k]))
        lin = nn.Linear(sizes[k], sizes[k + 1]).to(DT)
        s = out_scale if (out_scale is not None and k == n_lin - 1) else scale
        with torch.no_grad():
            lin.weight.copy_(s * torch.randn(lin.weight.shape, generator=g, dtype=DT) / math.sqrt(sizes[k]))
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g, dtype=DT))
        layers.append(lin)
        if k < n_lin - 1:
            layers.append(ACTS[acts[k]]())
    return nn.Sequential(*layers)


def data(n: int, d: int, c: int, *, seed: int, scale: float = 1.0):
    g = gen(seed + 10_000)
    X = scale * torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    return X, y


class ElmanLocked(nn.Module):
    """Elman RNN written with ``nn.Linear`` in a Python loop over time:
    ``h_t = tanh(W_x x_t + W_h h_{t-1} + b)``; ``LockedDropout`` on the input
    sequence and on the hidden sequence before a linear decoder.  Input
    ``(T, B, D)``, logits ``(T, B, c)``."""

    def __init__(self, d=2, hidden=3, classes=3, q_in=0.3, q_out=0.2, *, seed=0, scale=1.5):
        super().__init__()
        g = gen(seed)
        self.drop_in = dc.LockedDropout(q_in)
        self.wx = nn.Linear(d, hidden).to(DT)
        self.wh = nn.Linear(hidden, hidden, bias=False).to(DT)
        self.drop_out = dc.LockedDropout(q_out)
        self.decoder = nn.Linear(hidden, classes).to(DT)
        self.hidden = hidden
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(max(p.shape[-1], 1)))

    def forward(self, x):
        x = self.drop_in(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        outs = []
        for t in range(x.shape[0]):
            h = torch.tanh(self.wx(x[t]) + self.wh(h))
            outs.append(h)
        return self.decoder(self.drop_out(torch.stack(outs)))


class WeightDropRNN(nn.Module):
    """``nn.RNN`` whose recurrent weight passes through ``dc.WeightDrop``
    (DropConnect, one mask per forward pass), then a linear decoder."""

    def __init__(self, d=2, hidden=3, classes=3, q=0.3, *, seed=0, scale=1.5):
        super().__init__()
        g = gen(seed)
        self.rnn = dc.WeightDrop(nn.RNN(d, hidden).to(DT), ["weight_hh_l0"], q)
        self.decoder = nn.Linear(hidden, classes).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(max(p.shape[-1], 1)))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.decoder(out)


class DropConnectLinear(nn.Module):
    """A linear layer that applies ``dc.DropConnect`` to its own weight."""

    def __init__(self, d, c, q, *, seed=0, scale=1.5):
        super().__init__()
        g = gen(seed)
        self.weight = nn.Parameter(scale * torch.randn(c, d, generator=g, dtype=DT) / math.sqrt(d))
        self.bias = nn.Parameter(0.3 * torch.randn(c, generator=g, dtype=DT))
        self.dc = dc.DropConnect(q)

    def forward(self, x):
        return F.linear(x, self.dc(self.weight), self.bias)


def seq_data(T, B, D, c, *, seed):
    g = gen(seed + 20_000)
    return torch.randn(T, B, D, generator=g, dtype=DT), torch.randint(0, c, (T, B), generator=g)


def build(case):
    """``(model, X, y)`` from an ``mlp_cases`` description (``xscale`` optional)."""
    model = mlp(case["sizes"], case["acts"], case["sites"], seed=case["seed"], scale=case["scale"],
                site_cls=case.get("site_cls", nn.Dropout))
    X, y = data(case["n"], case["sizes"][0], case["sizes"][-1], seed=case["seed"], scale=case.get("xscale", 1.0))
    return model, X, y


# Edge cases used as @example by several test files.
SATURATED = dict(sizes=[3, 4, 3], acts=["tanh"], sites={0: 0.3, 1: 0.5}, scale=3.0, n=3, seed=5, xscale=30.0)


TINY_Q = dict(sizes=[3, 3, 3], acts=["softplus"], sites={0: 1e-3, 1: 1e-3}, scale=1.0, n=2, seed=1)


LAST_ONLY = dict(sizes=[2, 4, 4, 3], acts=["sigmoid", "elu"], sites={2: 0.4}, scale=2.0, n=3, seed=2)


def width_net(width, *, seed, d=4, c=3, q=0.1):
    """tanh layer → dropout → linear, output weights scaled by 1/sqrt(width)."""
    return mlp([d, width, c], ["tanh"], {1: q}, seed=seed, scale=1.5, out_scale=2.0)


def gaussian_net(q):
    """3 hidden tanh units with multiplicative Gaussian noise, one example:
    3 noise units (quadrature-friendly)."""
    model = mlp([3, 3, 3], ["tanh"], {1: q}, seed=4, scale=2.0, out_scale=3.0, site_cls=dc.GaussianDropout)
    X, y = data(1, 3, 3, seed=4)
    return model, X, y
