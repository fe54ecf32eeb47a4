"""Analytic mode: every dropout site becomes the identity plus a perturbation.

Inside ``analytic_mode(model, policy)`` each site module is put in eval mode
(so its own dropout is off) and a forward hook replaces its output by
``h + policy(occurrence)``.  An *occurrence* is one call of a site during a
forward pass (a module called twice gives two occurrences with independent
noise).  Policies decide what is added:

- ``None``: nothing (the clean network);
- an additive probe ``δ`` (a zero tensor that requires grad: its gradient is
  the gradient in ``h``; the estimators use this);
- multiplicative noise ``η ⊙ h`` drawn from a ``torch.Generator`` with the
  site's mask structure (Monte Carlo dropout with explicit randomness).

Everything is restored on exit, also when an exception is raised.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ._errors import DropcheckError
from ._sites import BERNOULLI, GAUSSIAN, SiteSpec, find_sites


@dataclass
class Occurrence:
    """One call of a site in a forward pass.

    ``h``: the site's input (with its autograd history); ``mask_shape``: the
    shape of the independent noise units, broadcastable to ``h``;
    ``delta``: what the policy added (or ``None``).
    """

    site: SiteSpec
    index: int
    h: torch.Tensor
    mask_shape: tuple[int, ...]
    delta: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.site.name if self.index == 0 else f"{self.site.name}#{self.index}"

    @property
    def units(self) -> int:
        return math.prod(self.mask_shape)

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """Broadcast a tensor of shape ``mask_shape`` to ``h``'s shape."""
        return mask.expand(self.h.shape)

    def unit_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor of ``h``'s shape (with optional leading batch dims) over
        the positions that share one noise unit: result ``(..., *mask_shape)``."""
        lead = t.shape[: t.dim() - self.h.dim()]
        return t.sum_to_size(*lead, *self.mask_shape)


Policy = Callable[[Occurrence], Optional[torch.Tensor]]


def unlock_positions(occs: list[Occurrence]) -> list[Occurrence]:
    """Treat locked sites as if their noise were independent per position
    (mask shape = ``h.shape``): the official code's approximation for the
    analytic terms of locked dropout (MATH.md, open points)."""
    for o in occs:
        if o.site.structure == "locked":
            o.mask_shape = tuple(o.h.shape)
    return occs


class AnalyticSession:
    """State of one ``analytic_mode`` context: the sites, the policy, and the
    occurrences recorded since the last ``reset()``."""

    def __init__(self, model: nn.Module, sites: Sequence[SiteSpec], policy: Optional[Policy]):
        self.model = model
        self.sites = list(sites)
        self.policy = policy
        self.occurrences: list[Occurrence] = []
        self._calls: dict[int, int] = {}

    def reset(self, policy: Optional[Policy] = ..., ) -> "AnalyticSession":
        if policy is not ...:
            self.policy = policy
        self.occurrences = []
        self._calls = {}
        return self

    def _hook(self, site: SiteSpec):
        def hook(module, args, output):
            h = args[0]
            idx = self._calls.get(id(module), 0)
            self._calls[id(module)] = idx + 1
            occ = Occurrence(site, idx, h, site.mask_shape(h))
            self.occurrences.append(occ)
            delta = self.policy(occ) if self.policy is not None else None
            occ.delta = delta
            return h if delta is None else h + delta

        return hook


@contextlib.contextmanager
def analytic_mode(
    model: nn.Module, policy: Optional[Policy] = None, sites: Optional[Sequence[SiteSpec]] = None
) -> Iterator[AnalyticSession]:
    """Switch every dropout site of ``model`` to identity + ``policy``.

    Yields an ``AnalyticSession`` whose ``occurrences`` list is filled during
    each forward pass (call ``session.reset()`` between passes).  The sites'
    training flags and hooks are restored on exit, even on error.
    """
    sites = find_sites(model) if sites is None else list(sites)
    session = AnalyticSession(model, sites, policy)
    saved = [(s.module, s.module.training) for s in sites]
    handles = []
    try:
        for s in sites:
            s.module.training = False
            handles.append(s.module.register_forward_hook(session._hook(s)))
        yield session
    finally:
        for hnd in handles:
            hnd.remove()
        for m, flag in saved:
            m.training = flag


# --------------------------------------------------------------------------
# policies


def zero_probe(occ: Occurrence) -> torch.Tensor:
    """Additive zero probe that requires grad: ``∂(·)/∂δ = ∂(·)/∂h``."""
    return torch.zeros_like(occ.h, requires_grad=True)


def as_generator(generator, device=None) -> torch.Generator:
    """A ``torch.Generator`` from a generator, an int seed, or ``None`` (seed 0
    is *not* implied: ``None`` draws a seed from torch's global RNG so that a
    caller that wants replay must pass one)."""
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator(device=device or "cpu")
    if generator is None:
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        g.manual_seed(int(generator))
    return g


def _rand(shape, like: torch.Tensor, gen: torch.Generator, kind: str) -> torch.Tensor:
    """Draw on the generator's device, then move to ``like``'s device."""
    dev = gen.device
    if kind == "uniform":
        t = torch.rand(shape, generator=gen, device=dev, dtype=like.dtype)
    else:
        t = torch.randn(shape, generator=gen, device=dev, dtype=like.dtype)
    return t.to(like.device)


def sample_eta(
    occ: Occurrence, gen: torch.Generator, noise: Optional[str] = None
) -> torch.Tensor:
    """Draw ``η`` of shape ``occ.mask_shape`` for one occurrence.

    ``noise``: ``None`` (the site's own: Bernoulli or Gaussian), ``"bernoulli"``
    (η = -1 w.p. q, q/(1-q) otherwise), ``"gaussian"`` (N(0, q/(1-q))) or
    ``"rademacher"`` (sqrt(q/(1-q)) · ±1, the paper's choice for ξ_approx).
    All have mean 0 and variance q/(1-q) (MATH.md, Notation).
    """
    q = occ.site.q
    kind = noise or occ.site.noise
    like = occ.h
    if kind == BERNOULLI:
        u = _rand(occ.mask_shape, like, gen, "uniform")
        return torch.where(u < q, torch.full_like(u, -1.0), torch.full_like(u, q / (1.0 - q)))
    if kind == GAUSSIAN:
        return math.sqrt(q / (1.0 - q)) * _rand(occ.mask_shape, like, gen, "normal")
    if kind == "rademacher":
        u = _rand(occ.mask_shape, like, gen, "uniform")
        return math.sqrt(q / (1.0 - q)) * torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))
    raise DropcheckError(
        f"unknown noise {kind!r}; expected one of 'bernoulli', 'gaussian', 'rademacher'"
    )


def rademacher(shape, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = _rand(shape, like, gen, "uniform")
    return torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))


def noise_policy(gen: torch.Generator, noise: Optional[str] = None, scale: float = 1.0) -> Policy:
    """Multiplicative noise: adds ``scale · η ⊙ h`` with ``η`` from ``sample_eta``;
    the drawn ``η`` is kept in ``occ.extra['eta']``."""

    def policy(occ: Occurrence) -> torch.Tensor:
        eta = sample_eta(occ, gen, noise)
        occ.extra["eta"] = eta
        return scale * occ.expand(eta) * occ.h

    return policy


def fixed_eta_policy(etas: Sequence[Optional[torch.Tensor]], scale: float = 1.0) -> Policy:
    """Adds ``scale · η_j ⊙ h`` with the j-th given ``η`` for the j-th occurrence."""
    counter = iter(range(10**12))

    def policy(occ: Occurrence) -> Optional[torch.Tensor]:
        j = next(counter)
        if j >= len(etas):
            raise DropcheckError(
                "the model called more dropout sites than in the recorded pass; "
                "dropcheck needs the same sites to be called in every forward pass"
            )
        eta = etas[j]
        if eta is None:
            return None
        return scale * occ.expand(eta.to(occ.h.dtype)) * occ.h

    return policy
