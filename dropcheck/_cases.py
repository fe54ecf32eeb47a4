"""Built-in verification cases: small float64 networks with every site type.

Each factory returns a ``Case``; all are seeded, so ``dropcheck verify`` is
reproducible.  ``spec`` describes MLP cases in the plain-dict form that the
symbolic route (``derivations``) can rebuild independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ._sites import GaussianDropout, LockedDropout, WeightDrop

_ACT = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "identity": nn.Identity}


@dataclass
class Case:
    name: str
    description: str
    model: nn.Module
    inputs: object
    targets: torch.Tensor
    # True where only the softmax follows every site (R_taylor = weighted R_approx exactly)
    linear_after_sites: bool = False
    spec: Optional[dict] = None
    extra: dict = field(default_factory=dict)


def mlp(sizes, acts, sites: dict, *, seed: int, scale: float = 1.0) -> nn.Sequential:
    """``sizes = [d0, ..., c]``; ``acts`` per hidden layer; ``sites`` maps the
    index of the dropped activation (0 = input) to ``q``."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        if sites.get(k, 0) > 0:
            layers.append(nn.Dropout(sites[k]))
        lin = nn.Linear(sizes[k], sizes[k + 1]).double()
        with torch.no_grad():
            lin.weight.copy_(scale * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            lin.bias.copy_(0.5 * torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(_ACT[acts[k]]())
    return nn.Sequential(*layers)


def mlp_spec(model: nn.Sequential, sizes, acts, sites, X, y) -> dict:
    """The plain-dict network description used by ``derivations.build_case``."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    return {
        "sizes": list(sizes),
        "activations": list(acts),
        "sites": [{"layer": k, "q": q} for k, q in sorted(sites.items()) if q > 0],
        "params": [{"weight": m.weight.detach().tolist(), "bias": m.bias.detach().tolist()} for m in lins],
        "X": X.tolist(),
        "y": y.tolist(),
    }


def _mlp_case(name, desc, sizes, acts, sites, n, seed, scale=1.0) -> Case:
    model = mlp(sizes, acts, sites, seed=seed, scale=scale)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    last = len(sizes) - 2
    lin_after = set(sites) <= {last}
    spec = {"name": name, **mlp_spec(model, sizes, acts, sites, X, y)}
    return Case(name, desc, model, X, y, lin_after, spec)


class TinyLockedRNN(nn.Module):
    """Elman RNN ``h_t = tanh(W [x_t, h_{t-1}] + b)`` with locked dropout on
    its input and its output sequence; logits ``(T, B, c)``."""

    def __init__(self, d_in=2, hidden=3, classes=3, q_in=0.3, q_out=0.4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.drop_in = LockedDropout(q_in)
        self.cell = nn.Linear(d_in + hidden, hidden).double()
        self.drop_out = LockedDropout(q_out)
        self.decoder = nn.Linear(hidden, classes).double()
        self.hidden = hidden

    def forward(self, x):
        x = self.drop_in(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        outs = []
        for t in range(x.shape[0]):
            h = torch.tanh(self.cell(torch.cat([x[t], h], -1)))
            outs.append(h)
        return self.decoder(self.drop_out(torch.stack(outs)))


def _rnn_case() -> Case:
    model = TinyLockedRNN(seed=3)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 2), generator=g)
    return Case("locked-rnn", "tanh RNN, locked dropout on input and outputs (T=4, B=2)", model, X, y)


def _dropconnect_case() -> Case:
    torch.manual_seed(5)
    model = nn.Sequential(
        WeightDrop(nn.Linear(3, 3).double(), ["weight"], 0.3), nn.Tanh(), nn.Linear(3, 3).double()
    )
    g = torch.Generator().manual_seed(6)
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    return Case("dropconnect", "DropConnect on a 3x3 weight, tanh, linear", model, X, y)


def _gaussian_case() -> Case:
    model = mlp([3, 4, 3], ["tanh"], {}, seed=7)
    model = nn.Sequential(model[0], model[1], GaussianDropout(0.2), model[2])
    g = torch.Generator().manual_seed(8)
    X = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    return Case("gaussian", "multiplicative Gaussian noise (var q/(1-q)) on a tanh layer", model, X, y)


CASES: dict[str, Callable[[], Case]] = {
    "mlp-tanh": lambda: _mlp_case(
        "mlp-tanh", "tanh MLP 3-4-3, dropout on input and hidden", [3, 4, 3], ["tanh"], {0: 0.3, 1: 0.2}, 2, 10
    ),
    "mlp-sigmoid-last": lambda: _mlp_case(
        "mlp-sigmoid-last", "sigmoid MLP 3-4-3, dropout on the last layer's input only",
        [3, 4, 3], ["sigmoid"], {1: 0.4}, 3, 11,
    ),
    "mlp-softplus-deep": lambda: _mlp_case(
        "mlp-softplus-deep", "softplus MLP 2-3-3-2, dropout on input and both hidden layers",
        [2, 3, 3, 2], ["softplus", "softplus"], {0: 0.2, 1: 0.3, 2: 0.1}, 1, 12,
    ),
    "softmax-regression": lambda: _mlp_case(
        "softmax-regression", "dropout on the input of a linear softmax model", [4, 3], [], {0: 0.5}, 3, 13
    ),
    "locked-rnn": _rnn_case,
    "dropconnect": _dropconnect_case,
    "gaussian": _gaussian_case,
}


def builtin_cases(names=None) -> list[Case]:
    names = list(CASES) if names is None else list(names)
    return [CASES[n]() for n in names]
