"""The update rules of the paper, each one config value ``rule``.

``REGISTRY`` maps each value to one small class (``NoDropout``, ``L2``,
``Dropout``, ...) with its ``objective`` (a differentiable scalar) and its
``noise`` (an additive gradient term, ``ξ̃_drop`` or ``ξ_approx``).  What each
rule computes, its coefficients per site group, the noise structure, the
generators and the shared-probe fast paths ``fd_shared``/``fd_mid`` are
described in docs/training.md, "The update rules".
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

import dropcheck as dc
from dropcheck import DropcheckError
from paper_figures.rule_labels import rule_label

from .lm import StatefulLM, detach_state as detach_hidden, get_arch

__all__ = [
    "REGISTRY",
    "Gens",
    "StepResult",
    "UpdateRule",
    "make_rule",
    "needs_double_backward",
    "rule_class",
    "sites_off",
    "lam",
]

SHARED_PROBE_ESTIMATORS = ("fd_shared", "fd_mid")
FIRST_ORDER_ESTIMATORS = ("fd", *SHARED_PROBE_ESTIMATORS)  # R_approx without a double backward


def lam(q: float) -> float:
    """λ = q/(2(1-q)), the coefficient matching dropout to second order (4.2)."""
    return dc.dropout_lambda(q)


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


def site_table(model: StatefulLM, arch: str = "awd-lstm") -> dict[str, tuple[dc.SiteSpec, str]]:
    """``{site name: (SiteSpec, group)}`` for every site with ``q > 0`` that a
    forward pass of ``model`` calls: the sites, their ``q`` and structure come
    from dropcheck's core (``dc.find_sites(model, tokens)`` on a two-token
    probe segment), the group from the architecture (``training.pipeline.lm.Arch``)."""
    p0 = next(model.parameters())
    probe = torch.zeros((2, 2), dtype=torch.long, device=p0.device)
    saved, model.hidden = model.hidden, None
    try:
        specs = dc.find_sites(model, probe, require=False)
    finally:
        model.hidden = saved
    a = get_arch(arch)
    return {s.name: (s, a.site_group(s, model)) for s in specs}


@contextlib.contextmanager
def sites_off(model: nn.Module, sites=None):
    """Every dropout site is the identity inside the block (the clean network):
    the site modules, and the modules whose functional dropout calls are
    sites (their ``p`` follows ``self.training``), are in eval mode.
    ``sites``: a ``site_table``, else the model's dropout modules."""
    if sites is None:
        mods = [s.module for s in dc.find_sites(model, require=False)]
    else:
        mods = [spec.module for spec, _g in sites.values()]
    saved = [m.training for m in mods]
    try:
        for m in mods:
            m.training = False
        yield
    finally:
        for m, t in zip(mods, saved):
            m.training = t


def _has_state(lm: nn.Module) -> bool:
    """Whether the language model carries a state between segments."""
    return bool(tree_leaves(lm.init_state(1)))


def state_midpoint(a, b):
    """``(a + b) / 2`` leaf by leaf (two states of one structure)."""
    return tree_map(lambda s, t: (s + t) / 2.0, a, b)


def _mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _dropout_policy(gens: Gens):
    """Dropout's own noise for ``dc.analytic_mode`` (``dc.noise_policy``: η = -1
    w.p. ``q``, ``q/(1-q)`` otherwise, one per noise unit of the site);
    weight sites draw from ``gens.shared``, the others from ``gens.local``."""
    shared = dc.noise_policy(gens.shared)
    local = shared if gens.shared is gens.local else dc.noise_policy(gens.local)

    def policy(occ: dc.Occurrence) -> torch.Tensor:
        return (shared if occ.site.structure == "weight" else local)(occ)

    return policy


@contextlib.contextmanager
def _record_hidden(model: StatefulLM):
    """Collects the new hidden state of every ``model.lm`` call in the block."""
    seen: list = []
    handle = model.lm.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    try:
        yield seen
    finally:
        handle.remove()


def _only(on, active) -> Optional[list]:
    """dropcheck's ``sites=``: the sites in ``on``, or ``None`` (all) when
    every active site is on."""
    return None if len(on) == len(active) else list(on)


def _factor(weights: Mapping[str, float]):
    """``(f, site_weights)``: a common weight is factored out (``site_weights``
    None), else ``(1, weights)``."""
    vals = list(weights.values())
    if all(v == vals[0] for v in vals):
        return vals[0], None
    return 1.0, dict(weights)


class UpdateRule:
    """The pieces every rule is built from; one subclass per rule (the
    ``REGISTRY`` below) says which pieces make its ``objective`` and its
    ``noise``.  Built by ``make_rule(cfg, model)``.

    The class attributes and class methods describe a rule from its config
    alone (no model), for the trainer, the bench, ``run_name`` and the
    figures' labels."""

    name: ClassVar[str]
    takes_k: ClassVar[bool] = False  # k draws per step (DROPOUT_k); run names end in -k<k>
    explicit: ClassVar[bool] = False  # adds an explicit regularizer R (needs a site with q > 0)
    shared_probe_ok: ClassVar[bool] = False  # estimator fd_shared / fd_mid is its fast path
    positions_ok: ClassVar[bool] = True  # takes noise_structure=positions
    hessian: ClassVar[str] = "output"  # H_out of the explicit term ("identity": I/c)

    # -- what the rule is, from its config -----------------------------------
    @classmethod
    def label(cls, cfg: Mapping[str, Any]) -> str:
        """The paper's name (Figures 1-5, Table 1); ``cfg`` may be a log header's
        partial config.  The names live in ``paper_figures.rule_labels`` (no
        torch), where the figures and claims read them."""
        return rule_label(cls.name, cfg)

    @classmethod
    def has_noise(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether ``noise`` adds a term (``ξ_approx`` or ``ξ̃_drop``)."""
        return cls.uses_xi_approx(cfg)

    @classmethod
    def uses_xi_approx(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether the noise is ``ξ_approx`` (``dc.implicit_noise``)."""
        return False

    @classmethod
    def uses_shared_probe(cls, cfg: Mapping[str, Any]) -> bool:
        return cls.shared_probe_ok and cfg["estimator"] in SHARED_PROBE_ESTIMATORS

    @classmethod
    def uses_estimator(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether config key ``estimator`` matters."""
        return False

    @classmethod
    def uses_noise_estimator(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether config key ``noise_estimator`` matters (the shared probe ignores it)."""
        return cls.uses_xi_approx(cfg) and not cls.uses_shared_probe(cfg)

    @classmethod
    def needs_double_backward(cls, cfg: Mapping[str, Any]) -> bool:
        """Whether the rule differentiates through a gradient (no cuDNN then)."""
        return cls.uses_noise_estimator(cfg) and cfg["noise_estimator"] == "autograd"

    # -- built on a model ----------------------------------------------------
    def __init__(self, cfg: Mapping[str, Any], model: StatefulLM):
        self.cfg = dict(cfg)
        self.k = int(cfg["k"])
        self.arch = cfg.get("arch", "awd-lstm")
        self.sites = site_table(model, self.arch)  # name -> (SiteSpec, group): q and structure from the core
        self.groups = {n: g for n, (_s, g) in self.sites.items()}
        self.eps = float(cfg["eps"]) or None
        self.positions = cfg.get("noise_structure", "locked") == "positions"
        self.shared_probe = self.uses_shared_probe(cfg)
        self.center = "midpoint" if cfg["estimator"] == "fd_mid" else "clean"
        if self.explicit and cfg["estimator"] in SHARED_PROBE_ESTIMATORS and not self.shared_probe:
            fast = [n for n, c in REGISTRY.items() if c.shared_probe_ok]
            raise DropcheckError(
                f"config key 'estimator': {cfg['estimator']!r} (one probe shared by the explicit and the implicit "
                f"term) is the fast path of rules {', '.join(repr(n) for n in fast)} only, not of "
                f"{self.name!r}; use 'fd'"
            )
        if self.shared_probe and int(cfg["samples"]) != 1:
            raise DropcheckError(
                f"config key 'samples': estimator {cfg['estimator']!r} draws one probe per step, "
                f"got samples={cfg['samples']}"
            )
        if (self.explicit or self.has_noise(cfg)) and not self._active():
            raise DropcheckError(f"rule {self.name!r} needs at least one dropout site with q > 0; all q_* are 0")
        if self.shared_probe:
            self.shared_probe_weights()  # raises when the multipliers cannot share one probe
        self.stateful = _has_state(model.lm)  # read once: fd_mid's per-step path needs it
        if self.center == "midpoint" and self.shared_probe:
            lm = model.lm
            if lm.decoder is None:
                raise DropcheckError(f"estimator 'fd_mid' needs the model's trailing linear decoder; arch "
                                     f"{self.arch!r} has none: use fd_shared")
            if self.stateful and not hasattr(lm, "record_states"):
                raise DropcheckError(f"estimator 'fd_mid' carries the midpoint state to the next segment, which "
                                     f"arch {self.arch!r} cannot record (no record_states): use fd_shared")

    def objective(self, model: StatefulLM, x: torch.Tensor, y: torch.Tensor, gens: Gens) -> StepResult:
        """The differentiable part of the update (module docstring)."""
        raise NotImplementedError

    def noise(self, model: StatefulLM, x: torch.Tensor, y: torch.Tensor, gens: Gens) -> Optional[dict]:
        """The additive gradient term ``{parameter name: tensor}``, or ``None``."""
        return None

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

    # -- coefficients ---------------------------------------------------
    def explicit_weight(self, site_name: str) -> float:
        """``w = explicit_mult · explicit_mult_<g>``: the explicit coefficient over ``λ(q)``."""
        g = self.groups[site_name]
        return self.cfg["explicit_mult"] * self.cfg[f"explicit_mult_{g}"]

    def explicit_coef(self, site_name: str) -> float:
        """``c_g = λ(q) · explicit_mult · explicit_mult_<g>``."""
        return lam(self.sites[site_name][0].q) * self.explicit_weight(site_name)

    def implicit_mult(self, site_name: str) -> float:
        g = self.groups[site_name]
        return self.cfg["implicit_mult"] * self.cfg[f"implicit_mult_{g}"]

    def shared_probe_weights(self) -> tuple[float, float, dict]:
        """``(a, b, w)`` for ``dc.analytic_dropout_objective``: ``explicit_weight
        a``, ``implicit_weight b`` and ``site_weights w`` with ``a λ_i w_i = c_i``
        and ``b sqrt(w_i) = m_i`` for every active site (module docstring).
        Raises ``DropcheckError`` when no such triple exists."""
        active = self._active()
        e = {n: self.explicit_weight(n) if self.explicit else 0.0 for n in active}
        if not self.uses_xi_approx(self.cfg):  # no noise: the probe serves R̂ only
            return 1.0, 0.0, e
        m = {n: self.implicit_mult(n) for n in active}
        if all(v == 0 for v in e.values()):  # noise only: the probe is the noise
            return 0.0, 1.0, {n: m[n] * m[n] for n in active}
        if all(v == 0 for v in m.values()):  # explicit only
            return 1.0, 0.0, e
        ratio = {n: m[n] * m[n] / e[n] for n in active if e[n] > 0}
        first = next(iter(ratio))
        bad = [n for n in active if (e[n] == 0) != (m[n] == 0)] + [
            n for n, r in ratio.items() if not math.isclose(r, ratio[first], rel_tol=1e-9)
        ]
        if bad:
            per_group: dict[str, str] = {}
            for n in active:
                g = self.groups[n]
                per_group[g] = f"{g}: implicit {m[n]:g}, explicit {e[n]:g}"
            raise DropcheckError(
                "estimator 'fd_shared' shares one probe between the explicit and the implicit term, so each "
                "site's noise coefficient is tied to the square root of its explicit weight: "
                "(implicit_mult·implicit_mult_<g>)² / (explicit_mult·explicit_mult_<g>) must be the same "
                f"for every group with dropout, and 0 in both or neither; got {'; '.join(per_group.values())}. "
                "Use estimator=fd with noise_estimator=fd for independent coefficients"
            )
        return 1.0, m[first] / math.sqrt(e[first]), e

    def _active(self) -> list[str]:
        return [n for n, (spec, _g) in self.sites.items() if spec.q > 0]

    def _is_weight(self, name: str) -> bool:
        """One noise draw for the whole batch (DropConnect, embedding rows, batch-level stochastic depth)."""
        return self.sites[name][0].structure in ("weight", "batch")

    # -- data parallelism --------------------------------------------------
    def _probe_generator(self, gens: Gens, b: float, w: Mapping[str, float]) -> torch.Generator:
        """The one generator of the shared probe (module docstring)."""
        if gens.shared is gens.local or b == 0:
            return gens.local
        kinds = {self._is_weight(n) for n, v in w.items() if v > 0}
        if kinds == {True}:
            return gens.shared
        if not kinds or kinds == {False}:
            return gens.local
        raise DropcheckError(
            "estimator 'fd_shared' with several processes: its one probe is also the noise η, which must be "
            "one draw for the whole batch at DropConnect/row sites (seeded alike on every rank) and "
            "independent per sequence elsewhere, and one dropcheck call draws all probes from one generator. "
            "Run it in one process, or set q_weights=q_rows=0 (or their implicit multipliers to 0), or use "
            "estimator=fd with noise_estimator=fd"
        )

    def check_world_size(self, world: int) -> None:
        """Raises ``DropcheckError`` if the rule cannot run in ``world`` processes."""
        if self.shared_probe and world > 1:
            a, b, w = self.shared_probe_weights()
            g1, g2 = torch.Generator(), torch.Generator()
            self._probe_generator(Gens(g1, g2), b, w)

    # -- pieces ----------------------------------------------------------
    def clean(self, model: StatefulLM, x, y):
        with sites_off(model, self.sites):
            logits, hid = model.lm(x, model.hidden)
        return _mean_ce(logits, y), detach_hidden(hid)

    def dropout_k(self, model: StatefulLM, x, y, gens: Gens, k: int):
        """Mean loss over ``k`` independent draws (Algorithm 1) and the hidden
        state of the first draw."""
        if not self._active():
            loss, hid = self.clean(model, x, y)
            return loss, hid
        total, hid0 = None, None
        with dc.analytic_mode(model, _dropout_policy(gens)):
            for j in range(k):
                logits, hid = model.lm(x, model.hidden)
                L = _mean_ce(logits, y)
                total = L if total is None else total + L
                if j == 0:
                    hid0 = detach_hidden(hid)
        return total / k, hid0

    def explicit_term(self, model: StatefulLM, x, y, gens: Gens):
        """``Σ_sites c_g R_site`` (``R_approx`` (4.3)-(4.4) with ``H_out`` or, for
        ``hessian="identity"``, ``I/c``) and its per-group values (detached)."""
        cfg = self.cfg
        active = self._active()
        coefs = {n: self.explicit_coef(n) for n in active}
        common = dict(
            estimator=cfg["estimator"],
            samples=cfg["samples"],
            hessian=self.hessian,
            generator=gens.local,
            eps=self.eps,
            independent_positions=self.positions,
        )
        if cfg["estimator"] != "fd":
            per = dc.explicit_regularizer(model, x, y, weighted=False, per_site=True, **common)
            return self._combine(per, coefs)
        # fd: all sites in one probe pair, site i weighted λ(q_i)·w_i (probe sqrt(λ_i w_i) v_i)
        weights = {n: self.explicit_weight(n) for n in active}
        on = {n: v for n, v in weights.items() if v != 0}
        if not on:
            p0 = next(model.parameters())
            R = torch.zeros((), dtype=p0.dtype, device=p0.device)
            return R, {"R": R}
        factor, site_weights = _factor(on)
        R = factor * dc.explicit_regularizer(model, x, y, weighted=True, site_weights=site_weights,
                                             sites=_only(on, active), **common)
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

    def implicit_noise(self, model: StatefulLM, x, y, gens: Gens, scale: float) -> Optional[dict]:
        """``scale · Σ_g m_g ξ_approx,g`` (one Rademacher draw per noise unit);
        ``None`` when every multiplier is 0."""
        cfg = self.cfg
        active = self._active()
        mults = {n: scale * self.implicit_mult(n) for n in active}
        on = {n: mults[n] for n in active if mults[n] != 0}
        if not on:
            return None
        if gens.shared is gens.local:
            gen = gens.local
        else:  # whole-batch sites from the generator seeded alike on every rank
            gen = {n: gens.shared if self._is_weight(n) else gens.local for n in on}
        factor, site_weights = _factor(on)
        xi = dc.implicit_noise(model, x, y, estimator=cfg["noise_estimator"], eps=self.eps, noise="rademacher",
                               independent_positions=self.positions, generator=gen, site_weights=site_weights,
                               sites=_only(on, active))
        return {k: factor * v for k, v in xi.items()}

    def two_draw(self, model: StatefulLM, x, y, gens: Gens) -> dict:
        """``ξ̃_drop = ∇L_{η¹} - ∇L_{η²}`` with two fresh draws."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = []
        with dc.analytic_mode(model, _dropout_policy(gens)):
            for _ in range(2):
                logits, _h = model.lm(x, model.hidden)
                gs = torch.autograd.grad(_mean_ce(logits, y), [p for _, p in named], allow_unused=True, materialize_grads=True)
                grads.append(gs)
        return {n: a - b for (n, _), a, b in zip(named, grads[0], grads[1])}

    def _analytic_objective(self, model: StatefulLM, x, y, gens: Gens, weights: tuple, keep_hidden: bool):
        """``dc.analytic_dropout_objective`` with the rule's ``(a, b, w)``
        (``weights``) and ``hessian``, and the hidden state to carry on when
        ``keep_hidden`` (else ``None``): the clean pass's, or under
        ``center="midpoint"`` the mean of the two probe passes'."""
        a, b, w = weights
        site_weights = None if all(v == 1.0 for v in w.values()) else w
        kw = dict(explicit_weight=a, implicit_weight=b, hessian=self.hessian, eps=self.eps, site_weights=site_weights,
                  generator=self._probe_generator(gens, b, w), independent_positions=self.positions)
        if self.center == "midpoint":  # no clean pass
            kw.update(decoder=model.lm.decoder, center="midpoint")
        if not keep_hidden:
            return dc.analytic_dropout_objective(model, x, y, **kw), None
        if self.center == "midpoint":
            if not self.stateful:
                return dc.analytic_dropout_objective(model, x, y, **kw), model.lm.init_state(x.shape[1])
            with model.lm.record_states() as passes:
                res = dc.analytic_dropout_objective(model, x, y, **kw)
            if len(passes) != 2:
                raise DropcheckError(f"expected the states of 2 probe passes, got {len(passes)}")
            hid = state_midpoint(passes[0], passes[1])
            return res, detach_hidden(hid)
        with _record_hidden(model) as hiddens:
            res = dc.analytic_dropout_objective(model, x, y, **kw)
        # the first of its passes is the clean one (dc's docstring; tested)
        return res, detach_hidden(hiddens[0])

    def shared_probe_objective(self, model: StatefulLM, x, y, gens: Gens) -> StepResult:
        """Algorithm 2 as one objective (``estimator="fd_shared"``): the gradient
        of ``dc.analytic_dropout_objective`` is ``∇[L + Σ_i c_i R̂_i] + Σ_i m_i ξ̂_i``
        with one probe per step shared by both terms (module docstring)."""
        weights = self.shared_probe_weights()
        res, hid = self._analytic_objective(model, x, y, gens, weights, keep_hidden=True)
        return StepResult(res.objective, res.loss.detach(), {"R": (weights[0] * res.explicit).detach()}, hid)


# --- the rules: one class each, in the order `dropcheck train --list-keys` shows them ---

class NoDropout(UpdateRule):
    """``L`` with every site off."""

    name = "none"

    def objective(self, model, x, y, gens):
        loss, hid = self.clean(model, x, y)
        return StepResult(loss, loss.detach(), {}, hid)


class L2(UpdateRule):
    """``L + (l2/2) Σ‖W‖²`` over every trained parameter."""

    name = "l2"

    def objective(self, model, x, y, gens):
        loss, hid = self.clean(model, x, y)
        sq = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
        reg = 0.5 * self.cfg["l2"] * sq
        return StepResult(loss + reg, loss.detach(), {"R": reg.detach()}, hid)


class Dropout(UpdateRule):
    """DROPOUT_k, Algorithm 1: the mean loss over ``k`` independent draws."""

    name = "dropout"
    takes_k = True

    def objective(self, model, x, y, gens):
        loss, hid = self.dropout_k(model, x, y, gens, self.k)
        return StepResult(loss, loss.detach(), {}, hid)


class DropoutInject(Dropout):
    """DROPOUT_k plus ``sqrt((1-1/k)/2) · ξ̃_drop`` (Sec. 3.1)."""

    name = "dropout_inject"

    @classmethod
    def has_noise(cls, cfg):
        return int(cfg["k"]) > 1

    def noise(self, model, x, y, gens):
        if not self.has_noise(self.cfg):
            return None
        c = math.sqrt((1.0 - 1.0 / self.k) / 2.0)
        return {n: c * v for n, v in self.two_draw(model, x, y, gens).items()}


class DropoutImplicit(Dropout):
    """DROPOUT_k plus ``sqrt(1-1/k) · ξ_approx`` (Algorithm 4); with
    ``estimator`` fd_shared/fd_mid, ``ξ_approx`` is the shared-probe
    objective's noise term (explicit weight 0) added to the objective."""

    name = "dropout_implicit"
    shared_probe_ok = True

    @classmethod
    def uses_xi_approx(cls, cfg):
        return int(cfg["k"]) > 1

    @classmethod
    def uses_shared_probe(cls, cfg):
        return cls.uses_xi_approx(cfg) and super().uses_shared_probe(cfg)

    @classmethod
    def uses_estimator(cls, cfg):
        return cls.uses_shared_probe(cfg)  # it only chooses the route of ξ_approx

    def objective(self, model, x, y, gens):
        res = super().objective(model, x, y, gens)
        if not self.shared_probe:
            return res
        weights = self.shared_probe_weights()  # (0, b, m²): the probe is the noise
        probe, _ = self._analytic_objective(model, x, y, gens, weights, keep_hidden=False)
        xi = math.sqrt(1.0 - 1.0 / self.k) * weights[1] * probe.implicit_probe
        return res._replace(objective=res.objective + xi)

    def noise(self, model, x, y, gens):
        if not self.has_noise(self.cfg) or self.shared_probe:  # shared probe: the noise is in the objective
            return None
        return self.implicit_noise(model, x, y, gens, math.sqrt(1.0 - 1.0 / self.k))


class Explicit(UpdateRule):
    """``L + Σ_g c_g R_g`` ((4.3)-(4.4)); with ``estimator`` fd_shared/fd_mid
    the shared-probe objective with noise weight 0."""

    name = "explicit"
    explicit = True
    shared_probe_ok = True

    @classmethod
    def uses_estimator(cls, cfg):
        return True

    @classmethod
    def needs_double_backward(cls, cfg):
        if cls.uses_shared_probe(cfg):
            return False  # three forward passes, one first-order backward
        if cls.uses_estimator(cfg) and cfg["estimator"] not in FIRST_ORDER_ESTIMATORS:
            return True
        return super().needs_double_backward(cfg)

    def objective(self, model, x, y, gens):
        if self.shared_probe:
            return self.shared_probe_objective(model, x, y, gens)
        loss, hid = self.clean(model, x, y)
        R, reg = self.explicit_term(model, x, y, gens)
        return StepResult(loss + R, loss.detach(), reg, hid)

    def noise(self, model, x, y, gens):
        if not self.has_noise(self.cfg) or self.shared_probe:  # shared probe: the noise is in the objective
            return None
        return self.implicit_noise(model, x, y, gens, 1.0)


class ExplicitImplicit(Explicit):
    """``R_approx + ξ_approx`` in place of dropout (Algorithm 2)."""

    name = "explicit_implicit"

    @classmethod
    def uses_xi_approx(cls, cfg):
        return True


class _Ablation(Explicit):
    """An ablation of ``R_approx`` (Sec. 5): ``ξ_approx`` added only if
    ``ablation_noise``."""

    @classmethod
    def uses_xi_approx(cls, cfg):
        return bool(cfg["ablation_noise"])


class IdentityHessian(_Ablation):
    """``R_approx`` with ``H_out → I/c``; with ``estimator`` fd_shared/fd_mid
    the shared-probe objective with ``hessian="identity"``."""

    name = "identity_hessian"
    hessian = "identity"


class LossJacobian(_Ablation):
    """The ablation ``L + Σ_g c_g R̃_g`` with the loss Jacobian (5.1); always a
    double backward (``dc.loss_jacobian_regularizer``)."""

    name = "loss_jacobian"
    shared_probe_ok = False  # R̃ needs the loss Jacobian's own gradient (a double backward)
    positions_ok = False  # dc.loss_jacobian_regularizer keeps the sites' own structure

    @classmethod
    def uses_estimator(cls, cfg):
        return False

    @classmethod
    def needs_double_backward(cls, cfg):
        return True

    def explicit_term(self, model, x, y, gens):
        """``Σ_sites c_g R̃_site`` and its per-group values (detached)."""
        coefs = {n: self.explicit_coef(n) for n in self._active()}
        per = dc.loss_jacobian_regularizer(model, x, y, weighted=False, per_site=True)
        return self._combine(per, coefs)


REGISTRY: dict[str, type[UpdateRule]] = {
    c.name: c
    for c in (NoDropout, L2, Dropout, DropoutInject, Explicit, DropoutImplicit, ExplicitImplicit,
              IdentityHessian, LossJacobian)
}


def rule_class(name: str) -> type[UpdateRule]:
    """The registered class of config value ``rule``."""
    if name not in REGISTRY:
        raise DropcheckError(f"config key 'rule': expected one of {list(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def needs_double_backward(cfg: Mapping[str, Any]) -> bool:
    """Whether the config's rule differentiates through a gradient (no cuDNN then)."""
    return rule_class(cfg["rule"]).needs_double_backward(cfg)


def make_rule(cfg: Mapping[str, Any], model: StatefulLM) -> UpdateRule:
    """The update rule of ``cfg`` on ``model``."""
    return rule_class(cfg["rule"])(cfg, model)
