"""Brute-force float64 references and the core comparison checks.

Test modules ``import dc_helpers as H`` (``tests/dropcheck`` is on pytest's
``pythonpath``, see pyproject.toml).

Two layers:

1. *References* (``Wired``, ``bf_*``): written here, independent of
   dropcheck's code path.  A deep copy of the model has every dropout site
   replaced by a ``Tap`` module, so the network becomes a plain function of
   the site inputs ``h`` (or of an explicit noise ``η``).  Dense Jacobians
   and Hessians come from ``torch.autograd.functional``; the noise's second
   moment ``C = E[δδᵀ]/Var(η)`` is built from the site's own mask structure
   (``C[a, b] = h_a h_b 1[a, b share a noise unit]``).  Nothing here calls
   dropcheck's estimators, hooks or reference module; dropcheck is imported
   only for the site *classes* (to recognise them) and, in layer 2, for the
   functions under test.
2. *Checks* (``check_*``): one function per test family, returning the
   measured discrepancy between dropcheck and the reference (a relative
   error, a z-score, a ratio).  The test files assert on these numbers and
   ``test_mutations.py`` re-runs them with dropcheck deliberately broken
   (λ doubled, H_out replaced by the identity) to show they catch it.

Statistics: every statistical check returns a z-score of a sample mean with
its own estimated standard error; the tests accept ``|z| < Z_MAX = 4.5``,
a two-sided false-alarm rate of 6.8e-6 per test for a Gaussian statistic
(the means here are over >= 100 draws; skew of the per-draw values can raise
this by a small factor, still < 1e-4).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dropcheck as dc

DT = torch.float64
Z_MAX = 4.5  # two-sided Gaussian tail: P(|Z| > 4.5) = 6.8e-6

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


# =========================================================================
# models


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


# =========================================================================
# references: the network as a plain function of the site inputs


@dataclass
class SiteInfo:
    name: str
    q: float
    noise: str  # "bernoulli" | "gaussian"
    structure: str  # "position" | "locked" | "weight" | "channel"
    time_dim: int = 0

    @property
    def var(self) -> float:
        return self.q / (1.0 - self.q)

    @property
    def lam(self) -> float:
        return self.q / (2.0 * (1.0 - self.q))


def classify(m: nn.Module) -> Optional[SiteInfo]:
    """The test suite's own site recognition (independent of ``find_sites``)."""
    if isinstance(m, dc.LockedDropout):
        return SiteInfo("", float(m.p), "bernoulli", "locked", m.time_dim)
    if isinstance(m, dc.DropConnect):
        return SiteInfo("", float(m.p), "bernoulli", "weight")
    if isinstance(m, dc.GaussianDropout):
        return SiteInfo("", float(m.p), "gaussian", "position")
    if type(m) is nn.Dropout:
        return SiteInfo("", float(m.p), "bernoulli", "position")
    if type(m) in (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
        return SiteInfo("", float(m.p), "bernoulli", "channel")
    return None


def unit_ids(site: SiteInfo, h: torch.Tensor) -> torch.Tensor:
    """Long tensor of ``h``'s shape: the index of the noise unit each entry belongs to."""
    if site.structure == "locked":
        shape = list(h.shape)
        shape[site.time_dim] = 1
        n = math.prod(shape)
        return torch.arange(n).reshape(shape).expand(h.shape)
    if site.structure == "channel":  # (N, C, ...): one unit per example and channel
        n = h.shape[0] * h.shape[1]
        return torch.arange(n).reshape(h.shape[:2] + (1,) * (h.dim() - 2)).expand(h.shape)
    return torch.arange(h.numel()).reshape(h.shape)


@dataclass
class Call:
    key: str
    site: SiteInfo
    h: torch.Tensor  # detached site input of the clean pass
    units: torch.Tensor  # unit ids, shape of h

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1

    def unit_mask(self, u: int) -> torch.Tensor:
        return (self.units == u).to(DT)


class _Tap(nn.Module):
    def __init__(self, owner: "Wired", index: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.index = index

    def forward(self, h):
        return self._owner._tap(self.index, h)


class Wired:
    """A deep copy of ``model`` in which every dropout site is a ``_Tap``.

    ``logits(inputs, replace={j: h})`` makes the j-th site call return ``h``;
    ``logits(inputs, eta={j: η})`` multiplies it by ``1 + η[unit]`` (η flat
    over the call's units).  Calls are counted in forward order.
    """

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        self.sites: list[SiteInfo] = []
        for name, m in list(self.model.named_modules()):
            info = classify(m)
            if info is None or info.q == 0:
                continue
            info.name = name
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, _Tap(self, len(self.sites)))
            self.sites.append(info)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._actions: dict = {}
        self._trace: list = []

    def _tap(self, index, h):
        j = len(self._trace)
        self._trace.append((index, h))
        kind, val = self._actions.get(j, (None, None))
        if kind == "replace":
            return val
        if kind == "eta":
            ids = unit_ids(self.sites[index], h)
            return h * (1.0 + val[ids])
        return h

    def logits(self, inputs, replace=None, eta=None) -> torch.Tensor:
        acts = {}
        for j, v in (replace or {}).items():
            acts[j] = ("replace", v)
        for j, v in (eta or {}).items():
            if v is not None:
                acts[j] = ("eta", v)
        self._actions, self._trace = acts, []
        out = self.model(*inputs) if isinstance(inputs, tuple) else self.model(inputs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        self._actions = {}
        return out.reshape(-1, out.shape[-1])

    def calls(self, inputs) -> list[Call]:
        with torch.no_grad():
            self.logits(inputs)
        trace, self._trace = self._trace, []
        seen: dict[int, int] = {}
        out = []
        for index, h in trace:
            k = seen.get(index, 0)
            seen[index] = k + 1
            site = self.sites[index]
            key = site.name if k == 0 else f"{site.name}#{k}"
            out.append(Call(key, site, h.detach().clone(), unit_ids(site, h)))
        return out

    def loss(self, inputs, targets, replace=None, eta=None) -> torch.Tensor:
        return F.cross_entropy(self.logits(inputs, replace, eta), targets.reshape(-1))

    def flat_grad(self, L, create_graph=False) -> torch.Tensor:
        gs = torch.autograd.grad(L, [p for _, p in self.params], create_graph=create_graph, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, (_, p) in zip(gs, self.params)]
        )

    @property
    def n_params(self) -> int:
        return sum(p.numel() for _, p in self.params)


def second_moment(call: Call) -> torch.Tensor:
    """Dense ``C = E[δδᵀ]/Var(η)`` over the flattened ``h``: ``h_a h_b 1[same unit]``."""
    ids = call.units.reshape(-1)
    h = call.h.reshape(-1)
    return (ids[:, None] == ids[None, :]).to(DT) * h[:, None] * h[None, :]


def per_position_moment(call: Call) -> torch.Tensor:
    """``diag(h²)``: what independent per-position noise would give."""
    return torch.diag(call.h.reshape(-1) ** 2)


def dense_jacobian(w: Wired, inputs, j: int, h: torch.Tensor) -> torch.Tensor:
    """``∂Z/∂h`` of the j-th site call, shape ``(N, c, numel(h))``."""
    J = torch.autograd.functional.jacobian(lambda hh: w.logits(inputs, replace={j: hh}), h)
    N, c = J.shape[:2]
    return J.reshape(N, c, -1)


def dense_hessian(w: Wired, inputs, targets, j: int, h: torch.Tensor) -> torch.Tensor:
    """``∂²L/∂h²`` of the batch-mean loss in the j-th site call, ``(numel, numel)``."""
    Hs = torch.autograd.functional.hessian(lambda hh: w.loss(inputs, targets, replace={j: hh}), h)
    return Hs.reshape(h.numel(), h.numel())


def output_hessians(Z: torch.Tensor, hessian: str = "output") -> torch.Tensor:
    if hessian == "identity":
        N, c = Z.shape
        return torch.eye(c, dtype=DT).expand(N, c, c) / c
    p = torch.softmax(Z, -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def bf_explicit(model, inputs, targets, *, weighted=True, hessian="output", moment=second_moment, scale=False):
    """``R_approx`` per site call: ``(1/N) Σ_n tr(H_n J_n C J_nᵀ)`` with dense matrices.

    ``H_out = diag(p) − ppᵀ = Pᵀ diag(p) P`` with ``P = I − 1pᵀ``, so the trace
    is evaluated as ``Σ_c p_c (J̃ C J̃ᵀ)_cc`` with the centred ``J̃ = P J``: no
    cancellation, accurate also for a saturated softmax.  ``scale=True`` also
    returns the magnitude ``Σ_c p_c (J C Jᵀ)_cc`` of the two terms that the
    form ``Σ p u² − (Σ p u)²`` subtracts (its float64 forward-error scale)."""
    w = Wired(model)
    calls = w.calls(inputs)
    with torch.no_grad():
        Z = w.logits(inputs)
    p = torch.softmax(Z, -1)
    out, scales = {}, {}
    for j, call in enumerate(calls):
        J = dense_jacobian(w, inputs, j, call.h)
        Cm = moment(call)
        lam = call.site.lam if weighted else 1.0
        if hessian == "identity":
            M = torch.einsum("nad,de,nbe->nab", J, Cm, J)
            out[call.key] = lam * float(M.diagonal(dim1=1, dim2=2).sum(1).mean()) / Z.shape[1]
            scales[call.key] = abs(out[call.key])
            continue
        Jc = J - torch.einsum("nc,ncd->nd", p, J)[:, None, :]
        Mc = torch.einsum("nad,de,nae->na", Jc, Cm, Jc)  # diagonal of J̃ C J̃ᵀ
        M = torch.einsum("nad,de,nae->na", J, Cm, J)
        out[call.key] = lam * float((p * Mc).sum(1).mean())
        scales[call.key] = lam * float((p * M.abs()).sum(1).mean())
    return (out, scales) if scale else out


def bf_taylor(model, inputs, targets, *, weighted=True, moment=second_moment) -> dict:
    """``R_taylor`` per site call: ``Σ_ab (∂²L/∂h²)_ab C_ab`` (× λ)."""
    w = Wired(model)
    out = {}
    for j, call in enumerate(w.calls(inputs)):
        Hs = dense_hessian(w, inputs, targets, j, call.h)
        out[call.key] = float((Hs * moment(call)).sum()) * (call.site.lam if weighted else 1.0)
    return out


def bf_deletions(model, inputs, targets) -> dict:
    """``Σ_u Δ_u`` per site call, ``Δ_u = L(unit u zeroed) − L + a_u·∂L/∂h``,
    by an explicit loop over units with the network as a function of ``h``."""
    w = Wired(model)
    out = {}
    for j, call in enumerate(w.calls(inputs)):
        h = call.h.clone().requires_grad_(True)
        L = w.loss(inputs, targets, replace={j: h})
        (g,) = torch.autograd.grad(L, h)
        total = 0.0
        with torch.no_grad():
            for u in range(call.n_units):
                m = call.unit_mask(u)
                Lu = w.loss(inputs, targets, replace={j: call.h * (1 - m)})
                total += float(Lu - L) + float((m * call.h * g).sum())
        out[call.key] = total
    return out


def _masks(calls: list[Call], q_override=None):
    """All keep/drop patterns over every unit of every call: yields
    ``(prob, {j: η_j})`` with Bernoulli η (−1 dropped, q/(1−q) kept)."""
    sizes = [c.n_units for c in calls]
    for bits in itertools.product((0, 1), repeat=sum(sizes)):
        prob, etas, pos = 1.0, {}, 0
        for j, (c, U) in enumerate(zip(calls, sizes)):
            b = torch.tensor(bits[pos : pos + U], dtype=DT)
            pos += U
            q = c.site.q if q_override is None else q_override
            nd = float(b.sum())
            prob *= q**nd * (1 - q) ** (U - nd)
            etas[j] = torch.where(b > 0, torch.tensor(-1.0, dtype=DT), torch.tensor(q / (1 - q), dtype=DT))
        yield prob, etas


def bf_gap_enum(model, inputs, targets) -> float:
    """``R_drop`` by enumerating the real masks (every site's own structure)."""
    w = Wired(model)
    calls = w.calls(inputs)
    with torch.no_grad():
        base = float(w.loss(inputs, targets))
        tot = 0.0
        for prob, etas in _masks(calls):  # Σ prob·(L − L0): no cancellation against L0
            tot += prob * (float(w.loss(inputs, targets, eta=etas)) - base)
    return tot


def _eta_split(calls, flat):
    out, pos = {}, 0
    for j, c in enumerate(calls):
        out[j] = flat[pos : pos + c.n_units]
        pos += c.n_units
    return out


def bf_noise_jacobian(model, inputs, targets):
    """``B = ∂/∂η ∇_W L(W; h ⊙ (1+η))`` at ``η = 0``, shape ``(P, U)``, and the
    per-unit variances: ``ξ_approx = B η`` (gradient through h and J_loss)."""
    w = Wired(model)
    calls = w.calls(inputs)
    U = sum(c.n_units for c in calls)

    def f(eta):
        return w.flat_grad(w.loss(inputs, targets, eta=_eta_split(calls, eta)), create_graph=True)

    B = torch.autograd.functional.jacobian(f, torch.zeros(U, dtype=DT))
    var = torch.cat([torch.full((c.n_units,), c.site.var, dtype=DT) for c in calls])
    return B, var


def bf_noise_cov(model, inputs, targets) -> torch.Tensor:
    B, var = bf_noise_jacobian(model, inputs, targets)
    return B @ (var[:, None] * B.T)


def bf_dropout_grad_moments(model, inputs, targets):
    """Exact mean and covariance of dropout's gradient ``∇_W L(F(x, η))`` by
    enumerating all masks (Bernoulli sites only; tiny nets)."""
    w = Wired(model)
    calls = w.calls(inputs)
    probs, gs = [], []
    for prob, etas in _masks(calls):
        probs.append(prob)
        gs.append(w.flat_grad(w.loss(inputs, targets, eta=etas)).detach())
    P = torch.tensor(probs, dtype=DT)
    G = torch.stack(gs)
    mean = (P[:, None] * G).sum(0)
    D = G - mean
    return mean, D.T @ (P[:, None] * D)


def bf_deletion_grad_cov(model, inputs, targets) -> torch.Tensor:
    """``lim_{q→0} Cov(ξ_drop)/q = Σ_u d_u d_uᵀ``, ``d_u = ∇L(unit u dropped) − ∇L``."""
    w = Wired(model)
    calls = w.calls(inputs)
    g0 = w.flat_grad(w.loss(inputs, targets)).detach()
    S = torch.zeros(g0.numel(), g0.numel(), dtype=DT)
    for j, c in enumerate(calls):
        for u in range(c.n_units):
            eta = torch.zeros(c.n_units, dtype=DT)
            eta[u] = -1.0
            d = w.flat_grad(w.loss(inputs, targets, eta={j: eta})).detach() - g0
            S += d[:, None] * d[None, :]
    return S


def gauss_hermite(dim: int, n: int):
    """Nodes ``(n^dim, dim)`` and weights for ``E[f(z)]``, ``z ~ N(0, I_dim)``."""
    x, wts = np.polynomial.hermite_e.hermegauss(n)
    wts = wts / math.sqrt(2 * math.pi)
    nodes = torch.tensor(list(itertools.product(x, repeat=dim)), dtype=DT)
    weights = torch.tensor([math.prod(c) for c in itertools.product(wts, repeat=dim)], dtype=DT)
    return nodes, weights


def bf_gaussian_gap(model, inputs, targets, q: float, n_nodes: int = 14) -> float:
    """Gaussian-noise dropout gap ``E[L(h(1+η))] − L``, ``η ~ N(0, q/(1−q))`` per
    unit, by tensor-product Gauss-Hermite quadrature (≤ 3 units in total)."""
    w = Wired(model)
    calls = w.calls(inputs)
    U = sum(c.n_units for c in calls)
    nodes, wts = gauss_hermite(U, n_nodes)
    s = math.sqrt(q / (1 - q))
    with torch.no_grad():
        base = float(w.loss(inputs, targets))
        tot = 0.0
        for z, wt in zip(nodes, wts):
            tot += float(wt) * float(w.loss(inputs, targets, eta=_eta_split(calls, s * z)))
    return tot - base


def bf_gaussian_grad_cov(model, inputs, targets, q: float, n_nodes: int = 14) -> torch.Tensor:
    """Covariance of ``∇_W L(h(1+η))`` for Gaussian ``η`` (variance q/(1−q)) by quadrature."""
    w = Wired(model)
    calls = w.calls(inputs)
    U = sum(c.n_units for c in calls)
    nodes, wts = gauss_hermite(U, n_nodes)
    s = math.sqrt(q / (1 - q))
    G = torch.stack([w.flat_grad(w.loss(inputs, targets, eta=_eta_split(calls, s * z))).detach() for z in nodes])
    mean = (wts[:, None] * G).sum(0)
    D = G - mean
    return D.T @ (wts[:, None] * D)


def softmax_regression_closed_form(W, b, X, q) -> float:
    """``λ mean_n Σ_k x_nk² (Wᵀ H_n W)_kk`` with ``(WᵀHW)_kk`` in the
    cancellation-free form ``Σ_c p_c (W_ck − Σ_c' p_c' W_c'k)²``."""
    p = torch.softmax(X @ W.T + b, -1)  # no dropout: the clean logits
    wbar = p @ W  # (N, d)
    diag = (p[:, :, None] * (W[None] - wbar[:, None, :]) ** 2).sum(1)  # (N, d)
    return q / (2 * (1 - q)) * float((X**2 * diag).sum(1).mean())


# =========================================================================
# Hypothesis strategies (bounded, finite; every draw is rebuilt from seeds)


def _st():
    from hypothesis import strategies as st

    return st


def mlp_cases(acts=tuple(ACTS), max_hidden=2, min_hidden=0, last_only=False, q_min=1e-3, q_max=0.9,
              max_n=4, max_width=4):
    """A float64 MLP description: 0..2 hidden layers of width 1..4, ``c`` in 2..4,
    sites on a nonempty subset of {input, hidden outputs} (``last_only``: only
    the last layer's input), q in [q_min, q_max], weight scale in [0.3, 3],
    1..max_n examples, integer seeds for the weights and the data."""
    st = _st()

    @st.composite
    def strat(draw):
        n_hidden = draw(st.integers(min_hidden, max_hidden))
        sizes = [draw(st.integers(1, max_width)) for _ in range(n_hidden + 1)] + [draw(st.integers(2, 4))]
        act = [draw(st.sampled_from(acts)) for _ in range(n_hidden)]
        if last_only:
            layers = {n_hidden}
        else:
            layers = draw(st.sets(st.integers(0, n_hidden), min_size=1))
        qs = {k: draw(st.floats(q_min, q_max)) for k in sorted(layers)}
        scale = draw(st.floats(0.3, 3.0))
        n = draw(st.integers(1, max_n))
        seed = draw(st.integers(0, 2**31 - 1))
        return dict(sizes=sizes, acts=act, sites=qs, scale=scale, n=n, seed=seed)

    return strat()


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


# =========================================================================
# statistics


def zscore(values, target: float) -> float:
    """``(mean − target)/stderr`` of i.i.d. draws (``inf`` for a zero stderr and a miss)."""
    v = torch.as_tensor(values, dtype=DT).reshape(-1)
    se = float(v.std(unbiased=True)) / math.sqrt(v.numel())
    d = float(v.mean()) - float(target)
    # Rounding floor: where the draws barely vary (e.g. a single noise unit makes
    # every Rademacher probe give the same value) the spread is rounding, and a
    # 1e-16 difference between two float64 routes is not a statistical miss.
    se = max(se, 1e-12 * max(abs(float(target)), abs(float(v.mean()))))
    if se == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / se


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def max_rel(d1: dict, d2: dict) -> float:
    assert set(d1) == set(d2), (sorted(d1), sorted(d2))
    return max(abs(float(d1[k]) - d2[k]) / max(abs(d2[k]), 1e-300) for k in d2)


def flat(grads: dict, model) -> torch.Tensor:
    """A gradient dict flattened in the model's parameter order."""
    return torch.cat([grads[n].reshape(-1) for n, p in model.named_parameters() if n in grads])


def direction(P: int, seed: int) -> torch.Tensor:
    r = torch.randn(P, generator=gen(seed), dtype=DT)
    return r / r.norm()


# =========================================================================
# checks: each returns the measured discrepancy (used by the tests and by
# test_mutations.py)


U64 = float(torch.finfo(DT).eps)  # 2.2e-16
# The exact estimator evaluates uᵀH_out u as Σ p u² − (Σ p u)²; its float64 forward
# error is a few ulps of the cancelling magnitude ``scale`` = Σ_c p_c u_c².  Errors are
# measured relative to max(|ref|, FLOOR·scale): a relative error <= 1e-9 where the
# value is resolvable, and <= 1e-9·FLOOR = 1.4e-14 of the scale where it is not
# (saturated softmax; test_explicit.py::test_saturated_softmax_relative_accuracy
# records that dropcheck does not reach relative accuracy there).
FLOOR = 64 * U64 / 1e-9  # 1.4e-5


def scaled_err(got: dict, ref: dict, scales: dict) -> float:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    return max(abs(float(got[k]) - ref[k]) / max(abs(ref[k]), FLOOR * scales[k], 1e-300) for k in ref)


def check_explicit_exact(model, X, y, *, weighted=True, hessian="output") -> float:
    """Max relative error (see ``FLOOR``), per site call and for the total, of
    ``explicit_regularizer("exact")`` vs the dense Jacobian route."""
    got = dc.explicit_regularizer(model, X, y, estimator="exact", weighted=weighted, hessian=hessian, per_site=True)
    ref, scales = bf_explicit(model, X, y, weighted=weighted, hessian=hessian, scale=True)
    err = scaled_err({k: float(v.detach()) for k, v in got.items()}, ref, scales)
    tot = float(dc.explicit_regularizer(model, X, y, estimator="exact", weighted=weighted, hessian=hessian).detach())
    return max(err, scaled_err({"t": tot}, {"t": sum(ref.values())}, {"t": sum(scales.values())}))


def check_softmax_regression(d, c, n, q, seed, logit_scale=1.0, relative_only=False) -> float:
    """``nn.Sequential(nn.Dropout(q), nn.Linear(d, c))`` vs the closed form."""
    model = mlp([d, c], [], {0: q}, seed=seed, scale=logit_scale)
    X, y = data(n, d, c, seed=seed)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    ref = softmax_regression_closed_form(W, b, X, q)
    p = torch.softmax(X @ W.T + b, -1)
    scale = q / (2 * (1 - q)) * float((X**2 * (p @ W**2)).sum(1).mean())
    got = float(dc.explicit_regularizer(model, X, y).detach())
    if relative_only:
        return rel(got, ref)
    return scaled_err({"t": got}, {"t": ref}, {"t": scale})


def check_taylor(model, X, y, *, weighted=True) -> float:
    """Max relative error per site call of ``taylor_regularizer`` vs ``Σ_ab
    (∂²L/∂h²)_ab C_ab`` with the dense autograd Hessian."""
    got = dc.taylor_regularizer(model, X, y, weighted=weighted, per_site=True)
    return max_rel({k: float(v.detach()) for k, v in got.items()}, bf_taylor(model, X, y, weighted=weighted))


def check_taylor_equals_explicit(model, X, y) -> float:
    """Relative difference (``FLOOR`` convention) of ``taylor_regularizer`` and
    the weighted ``explicit_regularizer``: 0 up to rounding where only the
    softmax follows every site."""
    t = float(dc.taylor_regularizer(model, X, y).detach())
    e = float(dc.explicit_regularizer(model, X, y).detach())
    ref, scales = bf_explicit(model, X, y, scale=True)
    return abs(t - e) / max(abs(e), FLOOR * sum(scales.values()), 1e-300)


def check_model_hessian_term(model, X, y) -> tuple[float, float]:
    """``(err, size)``: dropcheck's ``taylor − explicit`` vs the dense route's
    model-Hessian term ``Σ_c ∂ℓ/∂z_c ⟨D²F_c, C⟩`` (error relative to the
    dense taylor value), and that term's size relative to the dense taylor."""
    t = float(dc.taylor_regularizer(model, X, y).detach())
    e = float(dc.explicit_regularizer(model, X, y).detach())
    bt = sum(bf_taylor(model, X, y).values())
    be = sum(bf_explicit(model, X, y).values())
    return abs((t - e) - (bt - be)) / max(abs(bt), 1e-300), abs(bt - be) / max(abs(bt), 1e-300)


def check_first_order(model, X, y, q_small=1e-5) -> dict:
    """The first-order identity ``lim R_drop/q = Σ Δ``: relative errors of
    (a) dc exact gap at tiny q / q vs dc.first_order_gap, (b) first_order_gap
    vs the test's own deletion loop, (c) dc exact gap vs the test's own
    enumeration of the real masks."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if classify(mod) is not None and mod.p > 0:
            mod.p = q_small
    fo = dc.first_order_gap(m, X, y)
    est = dc.dropout_gap(m, X, y, exact=True, max_units=16)
    gap = est.value
    mine = sum(bf_deletions(m, X, y).values())
    enum = bf_gap_enum(m, X, y)
    base = float(Wired(m).loss(X, y).detach())
    return {
        "gap/q vs first_order": rel(gap / q_small, fo),
        "first_order vs loop": rel(fo, mine),
        "gap vs own enumeration": rel(gap, enum),
        "own gap/q vs first_order": rel(enum / q_small, fo),
        # dropcheck sums prob·L over the 2^M masks, then subtracts L0: rounding
        # up to ~2^M ulps of L0 (the test's own enumeration sums prob·(L − L0)).
        "gap abs err": abs(gap - enum),
        "rounding bound": 4 * est.samples * U64 * (abs(base) + 1.0),
        "first_order": fo,
    }


def limit_ratio(model, X, y) -> tuple[float, float]:
    """``lim_{q→0} R_drop/R_taylor = first_order_gap / (R_taylor(unweighted)/2)``,
    computed with ``taylor_regularizer`` and (second route, valid where only
    softmax follows the site) with the unweighted ``explicit_regularizer``."""
    fo = dc.first_order_gap(model, X, y)
    t = float(dc.taylor_regularizer(model, X, y, weighted=False).detach())
    e = float(dc.explicit_regularizer(model, X, y, weighted=False).detach())
    return fo / (t / 2), fo / (e / 2)


def width_net(width, *, seed, d=4, c=3, q=0.1):
    """tanh layer → dropout → linear, output weights scaled by 1/sqrt(width)."""
    return mlp([d, width, c], ["tanh"], {1: q}, seed=seed, scale=1.5, out_scale=2.0)


def check_estimator_unbiased(model, X, y, estimator, *, calls=60, samples=8, seed=0, weighted=True, target=None,
                             key=None):
    """z-score of ``calls`` independent estimator values (each the mean of
    ``samples`` probes) against the exact value (the dense route unless given);
    ``key``: one site's value (``per_site=True``) instead of the total."""
    if target is None:
        ref = bf_explicit(model, X, y, weighted=weighted)
        target = sum(ref.values()) if key is None else ref[key]
    g = gen(seed)
    vals = []
    for _ in range(calls):
        v = dc.explicit_regularizer(model, X, y, estimator=estimator, samples=samples, generator=g, weighted=weighted,
                                    per_site=key is not None)
        vals.append(float((v if key is None else v[key]).detach()))
    return zscore(vals, target)


def fd_bias_ratio(model, X, y, eps, seed=3) -> tuple[float, float]:
    """``(fd(ε) − hutch)/(fd(ε/2) − hutch)`` with the same generator seed (hence
    the same Rademacher probe; ``per_site=True`` so fd probes one site at a time
    like hutchinson), summed over sites, and the relative size of the ε bias."""

    def tot(est, e=None):
        d = dc.explicit_regularizer(model, X, y, estimator=est, generator=seed, eps=e, per_site=True)
        return sum(float(v.detach()) for v in d.values())

    h, f1, f2 = tot("hutchinson"), tot("fd", eps), tot("fd", eps / 2)
    return (f1 - h) / (f2 - h), abs(f1 - h) / abs(h)


def check_noise_cov_exact(model, X, y) -> float:
    got = dc.implicit_noise_covariance(model, X, y)
    ref = bf_noise_cov(model, X, y)
    return float((got - ref).abs().max() / ref.abs().max())


def check_noise_cov_empirical(model, X, y, *, n=200, seed=0, noise="rademacher") -> dict:
    """z-scores of ``E⟨ξ, r⟩² = rᵀCr`` and ``E‖ξ‖² = tr C`` for ``dc.implicit_noise``
    samples vs the dense covariance (ξ has mean 0 exactly, so the sample mean of
    squares is unbiased), and of ``E⟨ξ, r⟩ = 0``."""
    C = bf_noise_cov(model, X, y)
    r = direction(C.shape[0], seed + 1)
    g = gen(seed)
    proj, sq, lin = [], [], []
    for _ in range(n):
        xi = flat(dc.implicit_noise(model, X, y, generator=g, noise=noise), model)
        proj.append(float(xi @ r) ** 2)
        sq.append(float(xi @ xi))
        lin.append(float(xi @ r))
    return {"proj": zscore(proj, float(r @ C @ r)), "trace": zscore(sq, float(C.trace())), "mean": zscore(lin, 0.0)}


def drop_moments_proj(model, X, y, r):
    mean, cov = bf_dropout_grad_moments(model, X, y)
    return float(mean @ r), float(r @ cov @ r), mean, cov


def check_dropout_k(model, X, y, k, *, n=150, seed=0, injected=False) -> float:
    """z-score of ``E⟨g_k − ḡ, r⟩² = rᵀ Cov(ξ_drop) r / k`` (``injected``:
    ``= rᵀ Cov r``, DROPOUT_1's), ``ḡ`` and ``Cov`` exact by enumeration."""
    mean, cov = bf_dropout_grad_moments(model, X, y)
    r = direction(mean.numel(), seed + 7)
    m0, v = float(mean @ r), float(r @ cov @ r)
    g = gen(seed)
    fn = dc.noise_injected_dropout_k_gradient if injected else dc.dropout_k_gradient
    vals = [(float(flat(fn(model, X, y, k, generator=g), model) @ r) - m0) ** 2 for _ in range(n)]
    return zscore(vals, v if injected else v / k)


def check_two_draw(model, X, y, *, n=150, seed=0) -> float:
    mean, cov = bf_dropout_grad_moments(model, X, y)
    r = direction(mean.numel(), seed + 7)
    g = gen(seed)
    vals = [float(flat(dc.two_draw_noise(model, X, y, generator=g), model) @ r) ** 2 for _ in range(n)]
    return zscore(vals, 2 * float(r @ cov @ r))


def gaussian_net(q):
    """3 hidden tanh units with multiplicative Gaussian noise, one example:
    3 noise units (quadrature-friendly)."""
    model = mlp([3, 3, 3], ["tanh"], {1: q}, seed=4, scale=2.0, out_scale=3.0, site_cls=dc.GaussianDropout)
    X, y = data(1, 3, 3, seed=4)
    return model, X, y


def with_q(model, q):
    """A copy of ``model`` with every dropout site (q > 0) at drop probability ``q``."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if classify(mod) is not None and mod.p > 0:
            mod.p = q
    return m
