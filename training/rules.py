"""The update rules of the paper, each one config value ``rule``.

Every rule splits its update direction ``g`` into two parts:

- ``objective(...)``: a differentiable scalar whose parameter gradient is the
  deterministic-given-the-draws part of ``g`` (data loss, dropout loss,
  explicit regularizers).  The trainer back-propagates it (through
  DistributedDataParallel when there are several processes, see
  ``trainer.py``).
- ``noise(...)``: an additive gradient term that is not the gradient of a
  loss (``ξ̃_drop``, ``ξ_approx``), returned as ``{parameter name: tensor}``
  and added to ``.grad`` after the backward pass (all-reduced by the trainer).

Rules (``L`` is the mean cross-entropy over the tokens of the batch, ``L_η``
the same with dropout noise ``η``, ``R_g`` the unweighted regularizer of the
sites of group ``g``):

=====================  ============================================  ==========================================
rule                   objective                                     noise
=====================  ============================================  ==========================================
``none``               ``L`` (every site off)                        -
``l2``                 ``L + (l2/2) Σ‖W‖²``                          -
``dropout``            ``(1/k) Σ_j L_{η_j}``  (Algorithm 1)          -
``dropout_inject``     ``(1/k) Σ_j L_{η_j}``                         ``sqrt((1-1/k)/2) · ξ̃_drop`` (Sec. 3.1)
``explicit``           ``L + Σ_g c_g R_g``  ((4.3)-(4.4))            -
``dropout_implicit``   ``(1/k) Σ_j L_{η_j}``                         ``sqrt(1-1/k) · ξ_approx`` (Algorithm 4)
``explicit_implicit``  ``L + Σ_g c_g R_g``                           ``ξ_approx`` (Algorithm 2)
``identity_hessian``   ``L + Σ_g c_g R_g`` with ``H_out → I/c``      ``ξ_approx`` if ``ablation_noise``
``loss_jacobian``      ``L + Σ_g c_g R̃_g`` (5.1)                     ``ξ_approx`` if ``ablation_noise``
=====================  ============================================  ==========================================

with ``ξ̃_drop = ∇L_{η¹} - ∇L_{η²}`` (two fresh draws) and ``ξ_approx`` from
``dropcheck.implicit_noise`` (one Rademacher draw, ``η = sqrt(q/(1-q))·±1``).

Coefficients per site group ``g`` (``embedding``, ``hidden``, ``output``,
``weights``, ``rows``; see ``model.py``):

- explicit: ``c_g = λ(q_g) · explicit_mult · explicit_mult_<g>`` with the
  derived ``λ = q/(2(1-q))`` (1/3 at q = 0.4).  The official code and a
  third-party rerun use ``q/(1-q)`` (0.66 at q = 0.4): ``explicit_mult=2``.
- noise: ``m_g = implicit_mult · implicit_mult_<g>`` scales that group's
  ``η`` (so its share of ``Cov(ξ_approx)`` by ``m_g²``); 1 is the paper's
  untuned choice.

Noise draws come from explicit generators (``Gens``): ``local`` for noise
that is independent per sequence or position (locked and per-position
sites, sampled labels, Hutchinson probes), ``shared`` for noise that is one
draw for the whole batch (DropConnect and embedding-row masks).  In one
process the two are the same generator object, so a rule's draws follow
one stream in a fixed order (the objective's, then the noise's) and
coincide with dropcheck's own functions called with that generator in the
same order (tested).  Under data parallelism ``shared`` is seeded alike on
every rank, which makes the whole-batch masks one mask for the global
batch, as in a single process.

Per-group coefficients through dropcheck's public API: ``R_g`` comes from
``explicit_regularizer(..., per_site=True, weighted=False)`` (or
``loss_jacobian_regularizer``), multiplied per site.  The finite-difference
estimator probes all sites in one pass only in its ``weighted=True`` form,
whose per-site weight is ``λ(q_site)``; so for ``estimator="fd"`` with
non-uniform multipliers each site's ``q`` is set, for that call only, to
``q'`` with ``λ(q') = c_g`` (``q' = 2c/(1+2c)``).  Likewise ``ξ_approx``
with per-group multipliers sets ``q'`` with
``sqrt(q'/(1-q')) = m_g sqrt(q/(1-q))``: the Rademacher draws are the same
(uniform numbers compared with 1/2) and ``ξ_approx`` is linear in ``η``, so
the result is exactly ``Σ_g m_g ξ_g`` (tested).  A multiplier of 0 sets
``q' = 0``, which removes the site from that call.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

import dropcheck as dc
from dropcheck._errors import DropcheckError

from .configs import RULES
from .model import StatefulLM, all_sites, detach_hidden, site_groups

__all__ = [
    "Gens",
    "StepResult",
    "UpdateRule",
    "make_rule",
    "needs_double_backward",
    "sites_off",
    "lam",
]

DROPOUT_RULES = ("dropout", "dropout_inject", "dropout_implicit")
EXPLICIT_RULES = ("explicit", "explicit_implicit", "identity_hessian", "loss_jacobian")


def lam(q: float) -> float:
    """λ = q/(2(1-q)), the coefficient matching dropout to second order (4.2)."""
    return q / (2.0 * (1.0 - q))


@dataclass
class Gens:
    """Noise generators (see the module docstring); ``shared is local`` in one process."""

    local: torch.Generator
    shared: torch.Generator

    def state(self) -> dict:
        return {"local": self.local.get_state(), "shared": self.shared.get_state()}

    def load_state(self, st: Mapping[str, torch.Tensor]) -> None:
        self.local.set_state(st["local"])
        if self.shared is not self.local:
            self.shared.set_state(st["shared"])


class StepResult(NamedTuple):
    objective: torch.Tensor  # differentiable scalar
    loss: torch.Tensor  # detached data loss (dropout loss for dropout rules, clean loss otherwise)
    reg: dict  # detached regularizer values
    hidden: list  # detached hidden state to carry to the next batch


def needs_double_backward(cfg: Mapping[str, Any]) -> bool:
    """Whether the rule differentiates through a gradient (no cuDNN then)."""
    rule = cfg["rule"]
    noise = rule in ("dropout_implicit", "explicit_implicit") or (
        rule in ("identity_hessian", "loss_jacobian") and cfg["ablation_noise"]
    )
    if noise and cfg["noise_estimator"] == "autograd":
        if rule != "dropout_implicit" or cfg["k"] > 1:
            return True
    if rule == "loss_jacobian":
        return True
    if rule in ("explicit", "explicit_implicit", "identity_hessian") and cfg["estimator"] != "fd":
        return True
    return False


@contextlib.contextmanager
def sites_off(model: nn.Module):
    """Every dropout site is the identity inside the block (the clean network)."""
    mods = [m for _, m in all_sites(model)]
    saved = [m.training for m in mods]
    try:
        for m in mods:
            m.training = False
        yield
    finally:
        for m, t in zip(mods, saved):
            m.training = t


@contextlib.contextmanager
def _override_q(mods_q: Mapping[nn.Module, float]):
    saved = {m: m.p for m in mods_q}
    try:
        for m, q in mods_q.items():
            m.p = float(q)
        yield
    finally:
        for m, q in saved.items():
            m.p = q


def _mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _bernoulli_policy(gens: Gens):
    """Dropout noise for ``dc.analytic_mode``: ``η = -1`` w.p. ``q``, ``q/(1-q)``
    otherwise, one per noise unit of the site (``occ.mask_shape``); weight
    sites draw from ``gens.shared``, the others from ``gens.local``."""

    def policy(occ: dc.Occurrence) -> torch.Tensor:
        gen = gens.shared if occ.site.structure == "weight" else gens.local
        q = occ.site.q
        u = torch.rand(occ.mask_shape, generator=gen, device=gen.device, dtype=occ.h.dtype).to(occ.h.device)
        eta = torch.where(u < q, torch.full_like(u, -1.0), torch.full_like(u, q / (1.0 - q)))
        return occ.expand(eta) * occ.h

    return policy


class UpdateRule:
    """One update rule (module docstring); built by ``make_rule(cfg, model)``."""

    def __init__(self, cfg: Mapping[str, Any], model: StatefulLM):
        if cfg["rule"] not in RULES:
            raise DropcheckError(f"config key 'rule': expected one of {list(RULES)}, got {cfg['rule']!r}")
        self.cfg = dict(cfg)
        self.name = cfg["rule"]
        self.k = int(cfg["k"])
        self.groups = site_groups(model)
        self.modules = dict(all_sites(model))  # name -> site module
        self.eps = float(cfg["eps"]) or None
        if self.name in EXPLICIT_RULES or self._has_noise():
            active = [n for n, m in self.modules.items() if m.p > 0]
            if not active:
                raise DropcheckError(
                    f"rule {self.name!r} needs at least one dropout site with q > 0; all q_* are 0"
                )

    # -- coefficients ---------------------------------------------------
    def explicit_coef(self, site_name: str) -> float:
        g = self.groups[site_name]
        q = self.modules[site_name].p
        return lam(q) * self.cfg["explicit_mult"] * self.cfg[f"explicit_mult_{g}"]

    def implicit_mult(self, site_name: str) -> float:
        g = self.groups[site_name]
        return self.cfg["implicit_mult"] * self.cfg[f"implicit_mult_{g}"]

    def _has_noise(self) -> bool:
        if self.name in ("dropout_inject", "dropout_implicit"):
            return self.k > 1
        if self.name == "explicit_implicit":
            return True
        if self.name in ("identity_hessian", "loss_jacobian"):
            return bool(self.cfg["ablation_noise"])
        return False

    def _active(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.p > 0]

    # -- pieces ----------------------------------------------------------
    def clean(self, model: StatefulLM, x, y):
        with sites_off(model):
            logits, hid = model.lm(x, model.hidden)
        return _mean_ce(logits, y), detach_hidden(hid)

    def dropout_k(self, model: StatefulLM, x, y, gens: Gens, k: int):
        """Mean loss over ``k`` independent draws (Algorithm 1) and the hidden
        state of the first draw."""
        if not self._active():
            loss, hid = self.clean(model, x, y)
            return loss, hid
        total, hid0 = None, None
        with dc.analytic_mode(model, _bernoulli_policy(gens)):
            for j in range(k):
                logits, hid = model.lm(x, model.hidden)
                L = _mean_ce(logits, y)
                total = L if total is None else total + L
                if j == 0:
                    hid0 = detach_hidden(hid)
        return total / k, hid0

    def explicit_term(self, model: StatefulLM, x, y, gens: Gens):
        """``Σ_sites c_g R_site`` and its per-group values (detached)."""
        cfg = self.cfg
        active = self._active()
        coefs = {n: self.explicit_coef(n) for n in active}
        if self.name == "loss_jacobian":
            per = dc.loss_jacobian_regularizer(model, x, y, weighted=False, per_site=True)
            return self._combine(per, coefs)
        hessian = "identity" if self.name == "identity_hessian" else "output"
        common = dict(
            estimator=cfg["estimator"],
            samples=cfg["samples"],
            hessian=hessian,
            generator=gens.local,
            eps=self.eps,
        )
        if cfg["estimator"] != "fd":
            per = dc.explicit_regularizer(model, x, y, weighted=False, per_site=True, **common)
            return self._combine(per, coefs)
        # fd: all sites in one probe pair through weighted=True (weights λ(q)).
        ratios = {n: (coefs[n] / lam(self.modules[n].p)) for n in active}
        vals = list(ratios.values())
        if all(abs(v - vals[0]) <= 1e-12 * max(1.0, abs(vals[0])) for v in vals):
            R = vals[0] * dc.explicit_regularizer(model, x, y, weighted=True, **common)
        else:
            qs = {self.modules[n]: 2.0 * c / (1.0 + 2.0 * c) for n, c in coefs.items()}
            with _override_q(qs):
                R = dc.explicit_regularizer(model, x, y, weighted=True, **common)
        return R, {"R": R.detach()}

    def _combine(self, per: Mapping[str, torch.Tensor], coefs: Mapping[str, float]):
        total = None
        by_group: dict[str, torch.Tensor] = {}
        for key, val in per.items():
            name = key.split("#", 1)[0]
            c = coefs.get(name, 0.0)
            term = c * val
            total = term if total is None else total + term
            g = self.groups[name]
            by_group[g] = by_group.get(g, 0.0) + term.detach()
        if total is None:
            raise DropcheckError("no dropout site was called in the forward pass")
        reg = {"R": total.detach(), **{f"R/{g}": v for g, v in by_group.items()}}
        return total, reg

    def implicit_noise(self, model: StatefulLM, x, y, gens: Gens, scale: float) -> dict:
        """``scale · Σ_g m_g ξ_approx,g`` (one Rademacher draw per noise unit)."""
        cfg = self.cfg
        active = self._active()
        mults = {n: scale * self.implicit_mult(n) for n in active}
        kw = dict(estimator=cfg["noise_estimator"], eps=self.eps, noise="rademacher")
        split = gens.shared is not gens.local
        parts = [("all", active, gens.local)] if not split else [
            ("weight", [n for n in active if self._is_weight(n)], gens.shared),
            ("local", [n for n in active if not self._is_weight(n)], gens.local),
        ]
        out: Optional[dict] = None
        for _, names, gen in parts:
            if not names or all(mults[n] == 0 for n in names):
                continue
            vals = [mults[n] for n in names]
            uniform = all(v == vals[0] for v in vals) and len(names) == len(active)
            if uniform:
                xi = dc.implicit_noise(model, x, y, generator=gen, **kw)
                xi = {k: vals[0] * v for k, v in xi.items()}
            else:
                qs = {}
                for n, m in self.modules.items():
                    if m.p == 0:
                        continue
                    if n not in names:
                        qs[m] = 0.0
                    else:
                        r = mults[n] ** 2 * m.p / (1.0 - m.p)
                        qs[m] = r / (1.0 + r)
                with _override_q(qs):
                    xi = dc.implicit_noise(model, x, y, generator=gen, **kw)
            out = xi if out is None else {k: out[k] + xi[k] for k in out}
        return out

    def _is_weight(self, name: str) -> bool:
        return self.groups[name] in ("weights", "rows")

    def two_draw(self, model: StatefulLM, x, y, gens: Gens) -> dict:
        """``ξ̃_drop = ∇L_{η¹} - ∇L_{η²}`` with two fresh draws."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = []
        with dc.analytic_mode(model, _bernoulli_policy(gens)):
            for _ in range(2):
                logits, _h = model.lm(x, model.hidden)
                gs = torch.autograd.grad(_mean_ce(logits, y), [p for _, p in named], allow_unused=True, materialize_grads=True)
                grads.append(gs)
        return {n: a - b for (n, _), a, b in zip(named, grads[0], grads[1])}

    # -- the two halves --------------------------------------------------
    def objective(self, model: StatefulLM, x: torch.Tensor, y: torch.Tensor, gens: Gens) -> StepResult:
        r = self.name
        if r in DROPOUT_RULES:
            loss, hid = self.dropout_k(model, x, y, gens, self.k)
            return StepResult(loss, loss.detach(), {}, hid)
        loss, hid = self.clean(model, x, y)
        if r == "none":
            return StepResult(loss, loss.detach(), {}, hid)
        if r == "l2":
            sq = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
            reg = 0.5 * self.cfg["l2"] * sq
            return StepResult(loss + reg, loss.detach(), {"R": reg.detach()}, hid)
        R, reg = self.explicit_term(model, x, y, gens)
        return StepResult(loss + R, loss.detach(), reg, hid)

    def noise(self, model: StatefulLM, x: torch.Tensor, y: torch.Tensor, gens: Gens) -> Optional[dict]:
        if not self._has_noise():
            return None
        if self.name == "dropout_inject":
            c = math.sqrt((1.0 - 1.0 / self.k) / 2.0)
            xi = self.two_draw(model, x, y, gens)
            return {n: c * v for n, v in xi.items()}
        scale = math.sqrt(1.0 - 1.0 / self.k) if self.name == "dropout_implicit" else 1.0
        return self.implicit_noise(model, x, y, gens, scale)

    def gradient(self, model: StatefulLM, x, y, gens: Gens) -> tuple[dict, StepResult]:
        """The full update direction ``{name: tensor}`` in one process
        (objective gradient + noise), without touching ``.grad``."""
        res = self.objective(model, x, y, gens)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gs = torch.autograd.grad(res.objective, [p for _, p in named], allow_unused=True, materialize_grads=True)
        g = {n: v for (n, _), v in zip(named, gs)}
        xi = self.noise(model, x, y, gens)
        if xi is not None:
            g = {n: v + xi[n] for n, v in g.items()}
        return g, res


def make_rule(cfg: Mapping[str, Any], model: StatefulLM) -> UpdateRule:
    return UpdateRule(cfg, model)
