"""Dropout sites: the modules whose noise dropcheck analyses.

A *site* is a module that multiplies its input ``h`` by ``(1 + η)``, with
``η`` drawn independently per *unit* of a site-specific *mask shape* and
broadcast over the rest of ``h`` (docs/math.md, "Structure of the noise"):

=====================  ==============================  ==========================
site                   mask shape for input ``h``      structure
=====================  ==============================  ==========================
``nn.Dropout``         ``h.shape``                     per position
``GaussianDropout``    ``h.shape``                     per position, Gaussian η
``LockedDropout``      ``h.shape`` with time axis = 1  locked over time
``DropConnect``        ``W.shape`` (input is a weight) one mask per forward pass
``nn.Dropout1d/2d/3d`` ``h.shape[:2] + (1, ...)``      per channel
timm ``DropPath``      ``(N, 1, ..., 1)``              per example (stochastic depth)
torchvision            ``(N, 1, ..., 1)`` ("row") or   per example / one draw for
``StochasticDepth``    ``(1, ..., 1)`` ("batch")       the whole batch
=====================  ==============================  ==========================

Functional dropout (``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout``,
``torch.feature_dropout``) and attention dropout (``scaled_dot_product_attention``
with ``dropout_p > 0``, ``nn.MultiheadAttention``) have no module of their own:
they become sites while a forward pass runs (``_functional.py``), named after
the module that made the call.  timm and torchvision are not imported: their
stochastic-depth modules are recognised by class name and attributes.

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
from typing import Optional, Sequence

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
    "module_sites",
    "dropout_lambda",
    "BERNOULLI",
    "GAUSSIAN",
]


def _check_q(q: float, what: str) -> float:
    try:
        q = float(q)
    except (TypeError, ValueError) as exc:
        raise DropcheckError(f"{what}: drop probability q must be a number, got {q!r}") from exc
    if not (0.0 <= q < 1.0) or q != q:
        raise DropcheckError(f"{what}: drop probability q must lie in [0, 1), got {q!r}")
    return q


def dropout_lambda(q: float) -> float:
    """``λ = q/(2(1-q))``: half of dropout's noise variance ``Var η = q/(1-q)``,
    the weight that matches dropout to second order, eq. (4.2) (docs/math.md).
    The one place this constant is written; ``q ∈ [0, 1)``."""
    q = _check_q(q, "dropout_lambda")
    return q / (2.0 * (1.0 - q))


def _bernoulli_noise_mul(h: torch.Tensor, q: float, mask_shape: Sequence[int]) -> torch.Tensor:
    keep = torch.empty(mask_shape, dtype=h.dtype, device=h.device).bernoulli_(1.0 - q)
    return h * keep / (1.0 - q)


class LockedDropout(nn.Module):
    """Locked (variational) dropout: one mask per sequence, shared over time.

    Input ``h`` of shape ``(T, B, D)`` (``time_dim=0``, the AWD-LSTM layout) or
    ``(B, T, D)`` (``time_dim=1``); the mask has shape ``h.shape`` with the
    time axis set to 1, so ``E[δ_t δ_sᵀ] = q/(1-q) diag(h_t ⊙ h_s)`` (docs/math.md).
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
    Gauss-Newton form on the batch-mean loss (docs/math.md, DropConnect).
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
    its dropout gap is ``R_taylor + O(q²)`` (docs/math.md), unlike Bernoulli's.
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

    ``name`` is the module's qualified name in the model (for a functional
    site: the name of the module that made the call, then ``:`` and the
    attribute holding its ``q``, e.g. ``"model.layers.0.self_attn:attention_dropout"``;
    ``_functional.site_name``), ``q`` its drop
    probability, ``noise`` ``"bernoulli"`` or ``"gaussian"`` and ``structure``
    one of ``"position"``, ``"locked"``, ``"weight"``, ``"channel"``,
    ``"example"`` (one draw per example: stochastic depth) or ``"batch"``
    (one draw for the whole batch).  ``functional`` is true for sites made by
    a function call rather than by a dropout module.
    """

    name: str
    module: nn.Module
    q: float
    noise: str
    structure: str
    functional: bool = False

    @property
    def variance(self) -> float:
        """Var[η] = q/(1-q)."""
        return self.q / (1.0 - self.q)

    @property
    def lam(self) -> float:
        """λ = q/(2(1-q)): half the noise variance, the weight matching dropout (4.2)."""
        return dropout_lambda(self.q)

    def mask_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        m = self.module
        st = self.structure
        if not self.functional and st in ("locked", "weight") and hasattr(m, "mask_shape"):
            return tuple(m.mask_shape(h))
        if st == "channel":
            if h.dim() < 3:
                raise DropcheckError(
                    f"site {self.name!r} ({type(m).__name__}) needs batched input (N, C, ...), "
                    f"got shape {tuple(h.shape)}"
                )
            return tuple(h.shape[:2]) + (1,) * (h.dim() - 2)
        if st == "channel-unbatched":  # (C, ...) input of F.dropout1d/2d/3d
            return (h.shape[0],) + (1,) * (h.dim() - 1)
        if st == "example":
            if h.dim() < 1:
                raise DropcheckError(f"site {self.name!r} (stochastic depth) needs a batch axis, got a scalar")
            return (h.shape[0],) + (1,) * (h.dim() - 1)
        if st == "batch":
            return (1,) * h.dim()
        return tuple(h.shape)


_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_SUPPORTED_TEXT = (
    "dropcheck supports nn.Dropout, nn.Dropout1d/2d/3d, F.dropout/dropout1d/2d/3d, torch.dropout, "
    "attention dropout (scaled_dot_product_attention, nn.MultiheadAttention), LockedDropout, DropConnect, "
    "GaussianDropout, timm DropPath and torchvision StochasticDepth"
)


def _q_attribute(m: nn.Module) -> str:
    """The attribute that holds a module site's drop probability: timm's
    ``DropPath`` keeps it in ``drop_prob``, every other supported module in ``p``."""
    return "drop_prob" if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob") else "p"


def stochastic_depth_kind(m: nn.Module, name: str = "") -> Optional[tuple[float, str]]:
    """``(q, structure)`` if ``m`` is timm's ``DropPath`` or torchvision's
    ``StochasticDepth`` (recognised by class name and attributes, without
    importing either package), else ``None``.  Raises for a module of one of
    those names whose attributes say it is not mean-preserving dropout.

    - timm ``DropPath(drop_prob, scale_by_keep=True)``: ``x · m/(1-q)`` with
      one ``m ~ Bernoulli(1-q)`` per example: structure ``"example"``.
      ``scale_by_keep=False`` multiplies by ``m`` alone, whose mean is
      ``1-q``, not 1: refused.
    - torchvision ``StochasticDepth(p, mode)``: ``mode="row"`` one draw per
      example (``"example"``), ``mode="batch"`` one draw for the whole batch
      (``"batch"``).
    """
    cls = type(m).__name__
    where = f"module {name or '<root>'!r} ({cls})"
    if cls == "DropPath" and hasattr(m, "drop_prob"):
        if not getattr(m, "scale_by_keep", True):
            raise DropcheckError(
                f"{where} has scale_by_keep=False: its noise m ~ Bernoulli(1-q) has mean 1-q, not 1, so it is "
                "not dropout's mean-preserving multiplicative noise; use scale_by_keep=True"
            )
        return float(getattr(m, _q_attribute(m))), "example"
    if cls == "StochasticDepth" and hasattr(m, "p") and hasattr(m, "mode"):
        if m.mode in ("row", "batch"):
            return float(getattr(m, _q_attribute(m))), "example" if m.mode == "row" else "batch"
        raise DropcheckError(f"{where} has mode {m.mode!r}; expected 'row' or 'batch'")
    if cls in ("DropPath", "StochasticDepth", "DropBlock2d", "DropBlock", "DropPathBlock"):
        raise DropcheckError(
            f"{where} is a random module dropcheck does not understand (its attributes are not those of "
            f"timm's DropPath or torchvision's StochasticDepth); {_SUPPORTED_TEXT}"
        )
    return None


def module_sites(model: nn.Module, *, require: bool = True) -> list[SiteSpec]:
    """The dropout *modules* of ``model`` with ``q > 0``, in module order:
    ``find_sites(model)`` without inputs (``_site_api.py``, which adds the
    sites a forward pass calls; analytic mode hooks these).

    Raises ``NoDropoutSiteError`` when there are none (and ``require``), and
    a ``DropcheckError`` naming the module for dropout whose noise is not
    multiplicative (``AlphaDropout``) or that runs where dropcheck cannot
    see it (``nn.LSTM/GRU/RNN`` with ``dropout > 0`` between stacked
    layers): silently skipping one would give a wrong regularizer.
    """
    sites: list[SiteSpec] = []
    for name, m in model.named_modules():
        if isinstance(m, _UNSUPPORTED) and m.p > 0:
            raise DropcheckError(
                f"module {name!r} is {type(m).__name__}, whose noise is not multiplicative; " + _SUPPORTED_TEXT
            )
        if isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1:
            raise DropcheckError(
                f"module {name!r} is {type(m).__name__}(num_layers={m.num_layers}, dropout={m.dropout}): its "
                "dropout between stacked layers runs inside the fused kernel, where dropcheck cannot see it; "
                "stack single-layer modules with dropout modules (e.g. dropcheck.LockedDropout) between them"
            )
        sd = stochastic_depth_kind(m, name)
        if sd is not None:
            kind = (BERNOULLI, sd[1])
            q = _check_q(sd[0], f"stochastic depth module {name!r}")
            if q > 0:
                sites.append(SiteSpec(name or "<root>", m, q, kind[0], kind[1]))
            continue
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
            f"{type(model).__name__} has no dropout site with q > 0 among its modules (looked for nn.Dropout, "
            "nn.Dropout1d/2d/3d, dropcheck.LockedDropout, DropConnect, GaussianDropout, timm DropPath, "
            "torchvision StochasticDepth); functional dropout and attention dropout are found in a forward "
            "pass: find_sites(model, inputs)"
        )
    return sites
