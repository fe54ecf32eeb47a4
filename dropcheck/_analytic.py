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

Functional dropout (``F.dropout``), attention dropout and stochastic depth
become sites too (``_functional.py``, ``_sites.py``); the model runs in
training mode inside the context, so the results do not depend on the mode
the caller left it in.  Everything is restored on exit, also when an
exception is raised.
"""

from __future__ import annotations

import numbers

import contextlib
import contextvars
import functools
import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._common import call_model
from ._errors import DropcheckError, NoDropoutSiteError
from ._functional import FunctionalMode, module_caller, site_name
from ._session import PASS, functional_override
from ._sites import BERNOULLI, GAUSSIAN, SiteSpec, _check_q, module_sites


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
    analytic terms of locked dropout (docs/math.md, open points)."""
    for o in occs:
        if o.site.structure == "locked":
            o.mask_shape = tuple(o.h.shape)
    return occs


# --------------------------------------------------------------------------
# per-site options: which sites take part (``sites=``), per-site generators


SiteNames = Union[str, SiteSpec, Iterable[Union[str, SiteSpec]]]


def _names(sites: SiteNames, what: str) -> frozenset:
    if isinstance(sites, (str, SiteSpec)):
        sites = [sites]
    out = set()
    for s in sites:
        if isinstance(s, SiteSpec):
            out.add(s.name)
        elif isinstance(s, str):
            out.add(s)
        else:
            raise DropcheckError(f"{what}: expected site names, site keys ('name#1') or SiteSpecs, got {s!r}")
    return frozenset(out)


class SiteScope:
    """The per-site options of one call (``sites=``, per-site generators).

    ``sites``: the sites that take part, as site names (every call of the
    module or functional site), occurrence keys (``"name#1"``: that call
    only) or ``SiteSpec``s; ``None`` means all.  A site that does not take
    part is the identity in every pass of the call: no occurrence, no probe,
    no noise, no random draw, exactly as if its ``q`` were 0 (the remaining
    sites' draws are those they would get then).  ``seen`` collects the
    names and keys of every site occurrence met in the call's passes, so
    that names that match none are reported (``check``)."""

    def __init__(self, sites: Optional[SiteNames] = None):
        self.names = None if sites is None else _names(sites, "sites")
        self.seen: set = set()

    def takes(self, name: str, key: str) -> bool:
        self.seen.add(name)
        self.seen.add(key)
        return self.names is None or name in self.names or key in self.names

    def check(self, names: Optional[Iterable[str]] = None, what: str = "sites") -> None:
        """Raise ``DropcheckError`` for names (default: ``sites``) that match no
        site occurrence of the passes run so far."""
        names = self.names if names is None else names
        if names is None or not self.seen:  # no pass met a site (the pass itself raised)
            return
        unknown = sorted(set(names) - self.seen)
        if unknown:
            raise DropcheckError(
                f"{what} names unknown site(s) {unknown}; the sites of this forward pass are {sorted(self.seen)}"
            )


_SCOPE: contextvars.ContextVar = contextvars.ContextVar("dropcheck_site_scope", default=None)


@contextlib.contextmanager
def site_scope(sites: Optional[SiteNames] = None, generator=None) -> Iterator[SiteScope]:
    """The public estimators' ``sites=`` and per-site ``generator=``: every
    ``analytic_mode`` context inside the block uses ``sites`` (unless it is
    given its own).  On normal exit, names in ``sites`` or in a generator
    mapping that match no site of the passes raise ``DropcheckError``."""
    outer = _SCOPE.get()
    scope = outer if sites is None and outer is not None else SiteScope(sites)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
    if scope is not outer:
        scope.check()
    if isinstance(generator, SiteGenerators):
        generator = generator.mapping
    if isinstance(generator, Mapping):
        scope.check(generator.keys(), "generator")


def selection_active() -> bool:
    """Whether the current call leaves some sites out (``sites=`` given)."""
    scope = _SCOPE.get()
    return scope is not None and scope.names is not None


def site_options(fn):
    """Decorator of the public estimators: their keyword arguments ``sites``
    and ``generator`` set the call's ``site_scope`` (a call inside another's
    scope without ``sites`` keeps the outer one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with site_scope(kwargs.get("sites"), kwargs.get("generator")):
            return fn(*args, **kwargs)

    return wrapper


_DISCOVERED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _rng_state() -> tuple:
    """The default generators' states (CPU; CUDA's current device when CUDA
    is in use): any random draw in a pass changes them."""
    cpu = torch.random.default_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return cpu, torch.cuda.get_rng_state()
    return (cpu,)


def _same_state(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class AnalyticSession:
    """State of one ``analytic_mode`` context: the sites, the policy, and the
    occurrences recorded since the last ``reset()``."""

    def __init__(self, model: nn.Module, sites: Sequence[SiteSpec], policy: Optional[Policy],
                 scope: Optional[SiteScope] = None):
        self.model = model
        self.sites = list(sites)
        self.scope = scope  # which sites take part (None: all)
        self.policy = policy
        self.occurrences: list[Occurrence] = []
        self._calls: dict[str, int] = {}
        self._names: Optional[dict[int, str]] = None
        self._fspecs: dict[tuple, SiteSpec] = {}
        self.bypass = False  # dropcheck's own calls (policies) pass the mode untouched
        self.detect_only = False  # a pass run only to name a random module
        self.attention_depth = 0
        self.functional_seen = False  # the mode had work: it is needed in every pass
        self.saw_forward = False
        self.mode_on = False

    def reset(self, policy: Optional[Policy] = ..., ) -> "AnalyticSession":
        if policy is not ...:
            self.policy = policy
        self.occurrences = []
        self._calls = {}
        return self

    # -- recording ----------------------------------------------------------
    def record(self, site: SiteSpec, h: torch.Tensor) -> torch.Tensor:
        """One call of ``site`` on input ``h``: record it, return ``h + δ``."""
        self.saw_forward = True
        idx = self._calls.get(site.name, 0)
        self._calls[site.name] = idx + 1
        if self.scope is not None and not self.scope.takes(site.name, site.name if idx == 0 else f"{site.name}#{idx}"):
            return h  # not taking part: the identity, as with q = 0
        occ = Occurrence(site, idx, h, site.mask_shape(h))
        self.occurrences.append(occ)
        if self.policy is None or self.detect_only:
            return h
        self.bypass = True
        try:
            delta = self.policy(occ)
        finally:
            self.bypass = False
        occ.delta = delta
        return h if delta is None else h + delta

    def _hook(self, site: SiteSpec):
        def hook(module, args, output):
            return self.record(site, args[0])

        return hook

    def module_names(self) -> dict[int, str]:
        if self._names is None:
            self._names = {id(m): (n or "<root>") for n, m in self.model.named_modules()}
        return self._names

    def caller(self):
        """``(name, module)`` of the innermost module of the model on the
        Python stack (a frame whose ``self`` or ``module`` local is one), or
        ``(None, None)`` outside the model's forward pass."""
        return module_caller(self.module_names(), sys._getframe(1))

    def functional_site(self, h: torch.Tensor, q, structure: str, label: str) -> torch.Tensor:
        """A dropout call without a module of its own (``_functional.py``),
        named by ``_functional.site_name``; a drop probability that the model
        carries for it (``with_drop_probability``) replaces the call's."""
        self.functional_seen = True
        name, module = site_name(self.module_names(), sys._getframe(1), float(q), label)
        q = _check_q(q, f"{label} call in module {name.split(':')[0]!r}")
        q = functional_override(self.model, name, q)
        if q == 0.0:
            return h
        spec = self._fspecs.get(name)
        if spec is not None and (spec.q, spec.structure) != (q, structure):
            # one attribute read by calls of another kind or probability: keep names unique
            name = f"{name}@{q:g}" if spec.q != q else f"{name}:{label}"
            spec = self._fspecs.get(name)
        if spec is None:
            spec = SiteSpec(name, module if module is not None else self.model, q, BERNOULLI, structure,
                            functional=True)
            self._fspecs[name] = spec
        return self.record(spec, h)

    # -- passes ------------------------------------------------------------
    def run_pass(self, fn: Callable[[], object]):
        """Run one forward pass (``fn``) of the model: refuse a pass that drew
        random numbers dropcheck did not model, or that met no site."""
        before = len(self.occurrences)
        state = _rng_state()
        out = fn()
        if not _same_state(state, _rng_state()):
            self._random_pass(fn)
        if len(self.occurrences) == before and not self.detect_only:
            if self.scope is not None and self.scope.names is not None:
                self.scope.check()  # names that match no site: say so first
                raise NoDropoutSiteError(
                    f"{type(self.model).__name__}: none of the sites {sorted(self.scope.names)} (sites=) was "
                    "called in the forward pass"
                )
            raise NoDropoutSiteError(
                f"{type(self.model).__name__} has no dropout site with q > 0: a forward pass called none "
                "(looked for dropout modules, functional and attention dropout, stochastic depth)"
            )
        return out

    def _random_pass(self, fn) -> None:
        _DISCOVERED.pop(self.model, None)  # the next context runs with the mode again
        if not self.mode_on:  # run once more under the mode, which names the module
            self.detect_only = True
            try:
                with torch.no_grad(), FunctionalMode(self):
                    fn()
            finally:
                self.detect_only = False
        raise DropcheckError(
            f"a forward pass of {type(self.model).__name__} drew random numbers through an operation "
            "dropcheck does not see (e.g. the dropout inside a fused nn.LSTM/GRU, or a random C++ op); "
            "dropcheck would leave that noise in its analytic results, so it refuses the model"
        )


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(id(m) for m in model.modules())


def _keeps_eval(m: nn.Module) -> bool:
    """Modules that stay in eval mode in analytic passes: normalisation with
    running statistics (the deterministic network uses them)."""
    return isinstance(m, nn.modules.batchnorm._NormBase)


@contextlib.contextmanager
def analytic_mode(
    model: nn.Module, policy: Optional[Policy] = None, sites: Optional[SiteNames] = None
) -> Iterator[AnalyticSession]:
    """Switch every dropout site of ``model`` to identity + ``policy``.

    Yields an ``AnalyticSession`` whose ``occurrences`` list is filled during
    each forward pass (call ``session.reset()`` between passes).

    The network analysed is the same in train and eval mode: inside the
    context every module is in training mode (so that functional and
    attention dropout, which most libraries switch off with
    ``self.training``, show themselves) except the dropout modules, which are
    the identity plus the policy, and normalisation layers with running
    statistics (BatchNorm), which use them as in eval mode.  Functional and
    attention dropout become sites through ``_functional.FunctionalMode``
    (run on the first context of a model and, if it found work, in every
    later one); any other random draw in a forward pass is refused naming the
    module.  Training flags, hooks and buffers are restored exactly on
    exit, even on error.

    ``sites``: the sites that take part (site names, occurrence keys
    ``"name#1"`` or ``SiteSpec``s; default all, or those of the enclosing
    estimator call's ``sites=``).  The others are the identity, exactly as
    if their ``q`` were 0: no occurrence is recorded and the policy is not
    called for them.  A name that matches no site of the passes run inside
    the context raises ``DropcheckError`` on exit.
    """
    own = sites is not None
    scope = SiteScope(sites) if own else _SCOPE.get()
    session = AnalyticSession(model, module_sites(model, require=False), policy, scope)
    sites = session.sites
    site_ids = {id(s.module) for s in sites}
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, n, b, b._version, b.detach().clone()) for m in model.modules()
               for n, b in m._buffers.items() if b is not None]
    fp = _fingerprint(model)
    known = _DISCOVERED.get(model)
    need_mode = known is None or known[0] != fp or known[1]
    handles = []
    mode = None
    token = None
    try:
        for m, _ in flags:
            m.training = not (id(m) in site_ids or _keeps_eval(m))
        for s in sites:
            handles.append(s.module.register_forward_hook(session._hook(s)))
        session._parent = PASS.get()
        token = PASS.set(session)
        if need_mode:
            mode = FunctionalMode(session)
            mode.__enter__()
            session.mode_on = True
        yield session
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)
        if token is not None:
            PASS.reset(token)
        for hnd in handles:
            hnd.remove()
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for m, n, b, version, copy in buffers:
                if m._buffers.get(n) is not b:
                    m._buffers[n] = b
                if b._version != version:
                    b.copy_(copy)
        if session.saw_forward and (known is None or known[0] != fp):
            _DISCOVERED[model] = (fp, session.functional_seen)
    if own:
        scope.check()


def fired_sites(model: nn.Module, inputs) -> list[SiteSpec]:
    """The sites that one analytic forward pass on ``inputs`` calls, in call
    order, one entry per site (``find_sites(model, inputs)``; a module that
    makes functional calls with different ``p`` gives one entry per ``p``)."""
    with torch.no_grad(), analytic_mode(model, None) as session:
        session.detect_only = False
        try:
            call_model(model, inputs)
        except NoDropoutSiteError:
            return []
        seen: dict[int, SiteSpec] = {}
        for o in session.occurrences:  # a functional site: one spec per (caller, kind, q, structure)
            seen.setdefault(id(o.site), o.site)
    return list(seen.values())


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
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, numbers.Integral)
                                  or not -(2**63) <= int(generator) < 2**64):
        raise DropcheckError(f"generator must be a torch.Generator, an integer seed in [-2**63, 2**64) or None, "
                             f"got {generator!r}")
    g = torch.Generator(device=device or "cpu")
    if generator is None:
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        g.manual_seed(int(generator))
    return g


Generator = Union[torch.Generator, int, None]


class SiteGenerators:
    """The random streams of one call: one generator for every site, or one
    per site.  ``generator``: a ``torch.Generator``, an int seed, ``None``
    (a seed from torch's global RNG), or a mapping ``{site name or key:
    generator or seed}`` (an int becomes a generator of its own).  With a
    mapping every site that takes part draws from its own entry (a key
    ``"name#1"`` before the site's name) and must have one; the draws of a
    site are then exactly those of a call with that site alone and that
    generator.  Calling the object on an occurrence gives its generator."""

    def __init__(self, generator: Union[Generator, Mapping[str, Generator]] = None, device=None):
        self.mapping: Optional[dict] = None
        self.single: Optional[torch.Generator] = None
        if isinstance(generator, Mapping):
            self.mapping = {}
            for k, g in generator.items():
                if not isinstance(k, str):
                    raise DropcheckError(f"generator: a mapping's keys must be site names or keys, got {k!r}")
                self.mapping[k] = as_generator(g, device)
        else:
            self.single = as_generator(generator, device)

    def __call__(self, occ: "Occurrence") -> torch.Generator:
        if self.single is not None:
            return self.single
        g = self.mapping.get(occ.key)
        if g is None:
            g = self.mapping.get(occ.site.name)
        if g is None:
            raise DropcheckError(
                f"generator: the mapping gives no generator for site {occ.key!r}; it names {sorted(self.mapping)}"
            )
        return g

    def one(self, what: str) -> torch.Generator:
        """The generator of draws that belong to no site (e.g. sampled labels)."""
        if self.single is not None:
            return self.single
        gens = {id(g): g for g in self.mapping.values()}
        if len(gens) == 1:
            return next(iter(gens.values()))
        raise DropcheckError(f"{what} draws numbers shared by all sites, so it needs one generator, not a mapping "
                             "with several")


def site_generators(generator, device=None) -> SiteGenerators:
    """``SiteGenerators`` from what a public function's ``generator=`` takes
    (an existing ``SiteGenerators`` is returned as it is)."""
    return generator if isinstance(generator, SiteGenerators) else SiteGenerators(generator, device)


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
    All have mean 0 and variance q/(1-q) (docs/math.md, Notation).
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


def noise_policy(gen, noise: Optional[str] = None, scale: float = 1.0) -> Policy:
    """Multiplicative noise: adds ``scale · η ⊙ h`` with ``η`` from ``sample_eta``;
    the drawn ``η`` is kept in ``occ.extra['eta']``.  ``gen``: a generator, or
    per-site generators (a mapping, see ``SiteGenerators``)."""
    gens = site_generators(gen)

    def policy(occ: Occurrence) -> torch.Tensor:
        eta = sample_eta(occ, gens(occ), noise)
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
