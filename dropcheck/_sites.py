"""Dropout sites: the modules whose noise dropcheck analyses.

A *site* is a module that multiplies its input ``h`` by ``(1 + η)``, with
``η`` drawn independently per *unit* of a site-specific *mask shape* and
broadcast over the rest of ``h`` (MATH.md, "Structure of the noise"):

=====================  ==============================  ==========================
site                   mask shape for input ``h``      structure
=====================  ==============================  ==========================
``nn.Dropout``         ``h.shape``                     per position
``GaussianDropout``    ``h.shape``                     per position, Gaussian η
``LockedDropout``      ``h.shape`` with time axis = 1  locked over time
``DropConnect``        ``W.shape`` (input is a weight) one mask per forward pass
``nn.Dropout1d/2d/3d`` ``h.shape[:2] + (1, ...)``      per channel
=====================  ==============================  ==========================

Bernoulli noise: ``η = -1`` with probability ``q`` and ``q/(1-q)`` otherwise
(the usual ``mask/(1-q)``); Gaussian noise: ``η ~ N(0, q/(1-q))``.  Both have
``E[η] = 0`` and ``Var[η] = q/(1-q)``.

In normal training mode every site here behaves as ordinary dropout using
torch's global RNG; dropcheck's analytic and sampling modes replace that
behaviour through forward hooks (see ``_analytic.py``), so user models need
no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ._errors import DropcheckError, NoDropoutSiteError

BERNOULLI = "bernoulli"
GAUSSIAN = "gaussian"

__all__ = [
    "LockedDropout",
    "DropConnect",
    "GaussianDropout",
    "WeightDrop",
    "SiteSpec",
    "find_sites",
    "BERNOULLI",
    "GAUSSIAN",
]


def _check_q(q: float, what: str) -> float:
    q = float(q)
    if not (0.0 <= q < 1.0) or q != q:
        raise DropcheckError(f"{what}: drop probability q must lie in [0, 1), got {q!r}")
    return q


def _bernoulli_noise_mul(h: torch.Tensor, q: float, mask_shape: Sequence[int]) -> torch.Tensor:
    keep = torch.empty(mask_shape, dtype=h.dtype, device=h.device).bernoulli_(1.0 - q)
    return h * keep / (1.0 - q)


class LockedDropout(nn.Module):
    """Locked (variational) dropout: one mask per sequence, shared over time.

    Input ``h`` of shape ``(T, B, D)`` (``time_dim=0``, the AWD-LSTM layout) or
    ``(B, T, D)`` (``time_dim=1``); the mask has shape ``h.shape`` with the
    time axis set to 1, so ``E[δ_t δ_sᵀ] = q/(1-q) diag(h_t ⊙ h_s)`` (MATH.md).
    """

    def __init__(self, p: float = 0.5, time_dim: int = 0):
        super().__init__()
        self.p = _check_q(p, "LockedDropout")
        self.time_dim = int(time_dim)

    def mask_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        shape = list(h.shape)
        if h.dim() < 2:
            raise DropcheckError(
                f"LockedDropout expects at least 2 dims (time and features), got shape {tuple(h.shape)}"
            )
        shape[self.time_dim] = 1
        return tuple(shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        return _bernoulli_noise_mul(h, self.p, self.mask_shape(h))

    def extra_repr(self) -> str:
        return f"p={self.p}, time_dim={self.time_dim}"


class DropConnect(nn.Module):
    """DropConnect on a weight tensor: ``forward(W)`` returns ``W ⊙ m/(1-q)``.

    One mask per call (per forward pass), shared by every example of the
    batch.  The explicit penalty is ``λ ⟨D²_W L_batch, diag(W²)⟩`` in its
    Gauss-Newton form on the batch-mean loss (MATH.md, DropConnect).
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = _check_q(p, "DropConnect")

    def mask_shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return tuple(w.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return w
        return _bernoulli_noise_mul(w, self.p, self.mask_shape(w))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise ``h ⊙ (1 + η)``, ``η ~ N(0, q/(1-q))``.

    Same mean and variance as Bernoulli dropout with drop probability ``q``;
    its dropout gap is ``R_taylor + O(q²)`` (MATH.md), unlike Bernoulli's.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = _check_q(p, "GaussianDropout")

    def mask_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        return tuple(h.shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        sigma = (self.p / (1.0 - self.p)) ** 0.5
        return h * (1.0 + sigma * torch.randn_like(h))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WeightDrop(nn.Module):
    """Wrap ``module`` so that the named weights pass through ``DropConnect``.

    The parameters stay where they were (``wrapper.module.<name>``); each
    forward pass computes the dropped weights and calls the module with them
    through ``torch.func.functional_call``.  Each named weight gets its own
    ``DropConnect`` site, reachable as ``wrapper.drop[name]``.
    """

    def __init__(self, module: nn.Module, weights: Sequence[str], p: float = 0.5):
        super().__init__()
        if isinstance(weights, str):
            weights = [weights]
        params = dict(module.named_parameters())
        missing = [w for w in weights if w not in params]
        if missing:
            raise DropcheckError(
                f"WeightDrop: {type(module).__name__} has no parameter(s) {missing}; "
                f"it has {sorted(params)}"
            )
        self.module = module
        self.weights = list(weights)
        self.drop = nn.ModuleDict({w.replace(".", "__"): DropConnect(p) for w in self.weights})

    def forward(self, *args, **kwargs):
        params = dict(self.module.named_parameters())
        dropped = {w: self.drop[w.replace(".", "__")](params[w]) for w in self.weights}
        return torch.func.functional_call(self.module, dropped, args, kwargs, strict=False)


# --------------------------------------------------------------------------
# site discovery


@dataclass(frozen=True)
class SiteSpec:
    """A dropout site found in a model.

    ``name`` is the module's qualified name in the model, ``q`` its drop
    probability, ``noise`` ``"bernoulli"`` or ``"gaussian"`` and ``structure``
    one of ``"position"``, ``"locked"``, ``"weight"``, ``"channel"``.
    """

    name: str
    module: nn.Module
    q: float
    noise: str
    structure: str

    @property
    def variance(self) -> float:
        """Var[η] = q/(1-q)."""
        return self.q / (1.0 - self.q)

    @property
    def lam(self) -> float:
        """λ = q/(2(1-q)): half the noise variance, the weight matching dropout (4.2)."""
        return self.q / (2.0 * (1.0 - self.q))

    def mask_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        m = self.module
        if hasattr(m, "mask_shape"):
            return tuple(m.mask_shape(h))
        if self.structure == "channel":
            if h.dim() < 3:
                raise DropcheckError(
                    f"site {self.name!r} ({type(m).__name__}) needs batched input (N, C, ...), "
                    f"got shape {tuple(h.shape)}"
                )
            return tuple(h.shape[:2]) + (1,) * (h.dim() - 2)
        return tuple(h.shape)


_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED = (nn.AlphaDropout, nn.FeatureAlphaDropout)


def find_sites(model: nn.Module, *, require: bool = True) -> list[SiteSpec]:
    """All dropout sites of ``model`` with ``q > 0``, in module order.

    Raises ``NoDropoutSiteError`` when there are none (and ``require``), and
    a ``DropcheckError`` for dropout modules whose noise is not
    multiplicative (``AlphaDropout``): silently skipping one would give a
    wrong regularizer.
    """
    sites: list[SiteSpec] = []
    for name, m in model.named_modules():
        if isinstance(m, _UNSUPPORTED) and m.p > 0:
            raise DropcheckError(
                f"module {name!r} is {type(m).__name__}, whose noise is not multiplicative; "
                "dropcheck supports nn.Dropout, nn.Dropout1d/2d/3d, LockedDropout, DropConnect, "
                "GaussianDropout"
            )
        if isinstance(m, LockedDropout):
            kind = (BERNOULLI, "locked")
        elif isinstance(m, DropConnect):
            kind = (BERNOULLI, "weight")
        elif isinstance(m, GaussianDropout):
            kind = (GAUSSIAN, "position")
        elif isinstance(m, _CHANNEL):
            kind = (BERNOULLI, "channel")
        elif isinstance(m, nn.Dropout):
            kind = (BERNOULLI, "position")
        else:
            continue
        q = _check_q(m.p, f"dropout module {name!r}")
        if q == 0:
            continue
        sites.append(SiteSpec(name or "<root>", m, q, kind[0], kind[1]))
    if require and not sites:
        raise NoDropoutSiteError(
            f"{type(model).__name__} has no dropout site with q > 0 (looked for nn.Dropout, "
            "nn.Dropout1d/2d/3d, dropcheck.LockedDropout, DropConnect, GaussianDropout); "
            "functional F.dropout calls cannot be seen"
        )
    return sites
