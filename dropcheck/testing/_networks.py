"""Small float64 networks with dropout sites of every kind, built from a
plain description (a dict), so that a failing Hypothesis example prints a
description that rebuilds the same network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._sites import GaussianDropout, LockedDropout, WeightDrop

SITE_KINDS = ("dropout", "channel", "locked", "gaussian", "functional", "attention", "dropconnect", "drop_path")


class DropPath(nn.Module):
    """Stochastic depth with the class name, attributes and semantics of
    timm's ``DropPath`` (one Bernoulli draw per example, scaled by
    ``1/(1-q)``), so that networks here need no timm."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep if self.scale_by_keep else x * mask


class _Block(nn.Module):
    """``h ← tanh(W site(h))`` (or a residual / attention variant) on ``(N, T, d)``."""

    def __init__(self, kind: str, d: int, q: float):
        super().__init__()
        self.kind = kind
        if kind == "dropconnect":
            self.lin = WeightDrop(nn.Linear(d, d), "weight", q)
            return
        self.lin = nn.Linear(d, d)
        if kind == "dropout":
            self.drop = nn.Dropout(q)
        elif kind == "channel":
            self.drop = nn.Dropout1d(q)
        elif kind == "locked":
            self.drop = LockedDropout(q, time_dim=1)
        elif kind == "gaussian":
            self.drop = GaussianDropout(q)
        elif kind == "functional":
            self.dropout = q
        elif kind == "attention":
            self.attention_dropout = q
            self.qkv = nn.Linear(d, 3 * d)
        elif kind == "drop_path":
            self.drop_path = DropPath(q)
        else:
            raise ValueError(f"unknown site kind {kind!r}; expected one of {SITE_KINDS}")

    def forward(self, h):
        k = self.kind
        if k == "dropconnect":
            return torch.tanh(self.lin(h))
        if k == "channel":  # whole features dropped over time: (N, d, T) channels
            return torch.tanh(self.lin(self.drop(h.transpose(1, 2)).transpose(1, 2)))
        if k == "functional":
            return torch.tanh(self.lin(F.dropout(h, p=self.dropout, training=self.training)))
        if k == "attention":
            qq, kk, vv = self.qkv(h).chunk(3, -1)
            p = self.attention_dropout if self.training else 0.0
            a = F.scaled_dot_product_attention(qq, kk, vv, dropout_p=p, is_causal=True)
            return torch.tanh(self.lin(a)) + h
        if k == "drop_path":
            return h + self.drop_path(torch.tanh(self.lin(h)))
        return torch.tanh(self.lin(self.drop(h)))


class SmallNet(nn.Module):
    """``(N, T, d_in)`` floats → ``(N, T, classes)`` logits through a stack
    of blocks, each with one dropout site of the given kind and ``q``."""

    def __init__(self, d_in: int, d: int, classes: int, blocks):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([_Block(k, d, q) for k, q in blocks])
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.out(h)


@dataclass
class Case:
    """A network with a batch: ``model``, ``inputs``, ``targets`` (``-100``
    at ignored positions) and the ``spec`` it was built from
    (``build_case(spec)`` rebuilds it exactly)."""

    spec: dict
    model: nn.Module = field(repr=False)
    inputs: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)

    def __repr__(self) -> str:
        return f"build_case({self.spec!r})"


def build_case(spec: dict) -> Case:
    """Build a ``Case`` from a description: keys ``blocks`` (a list of
    ``(kind, q)``), ``d`` (width), ``classes``, ``n`` (examples), ``t``
    (positions), ``scale`` (weight scale), ``ignore`` (fraction of targets
    set to -100, at least one position kept) and ``seed``."""
    seed = int(spec["seed"])
    g = torch.Generator().manual_seed(seed)
    d_in = 3
    model = SmallNet(d_in, spec["d"], spec["classes"], [tuple(b) for b in spec["blocks"]]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(spec.get("scale", 1.0) * torch.randn(p.shape, generator=g, dtype=torch.float64)
                    / max(1, p.shape[-1]) ** 0.5)
    n, t = spec["n"], spec["t"]
    x = torch.randn(n, t, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec["classes"], (n, t), generator=g)
    ign = torch.rand(n, t, generator=g) < spec.get("ignore", 0.0)
    ign.view(-1)[0] = False
    y = torch.where(ign, torch.full_like(y, -100), y)
    return Case(dict(spec), model, x, y)
