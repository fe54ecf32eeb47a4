"""Brute-force float64 references, independent of dropcheck's code path.

A deep copy of the model has every dropout site replaced by a ``Tap``
module, so the network becomes a plain function of the site inputs ``h``
(or of an explicit noise ``η``).  Dense Jacobians and Hessians come from
``torch.autograd.functional``; the noise's second moment
``C = E[δδᵀ]/Var(η)`` is built from the site's own mask structure
(``C[a, b] = h_a h_b 1[a, b share a noise unit]``).  Nothing here calls
dropcheck's estimators, hooks or reference module; dropcheck is imported
only for the site *classes* (to recognise them).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dropcheck as dc
from dc_cases import DT


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
