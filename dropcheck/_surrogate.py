"""Algorithm 2 in one backward pass: a surrogate whose gradient is the update.

``analytic_dropout_objective`` runs three forward passes (clean, and
multiplicative probes ``h(1 ± ε√λ_i v_i)`` with one Rademacher ``v_i`` per
noise unit, shared by both terms) and returns a scalar ``S`` with

    ∇_W S = ∇_W [L + a·R̂_approx] + b·ξ̂_approx,

``R̂_approx`` the finite-difference estimate of the λ-weighted explicit
regularizer (4.4) and ``ξ̂_approx`` the finite-difference analytic noise
(4.5)-(4.6) with ``η_i = sqrt(q_i/(1-q_i)) v_i`` (the paper's scaled
Rademacher law).  Only first-order autograd is needed, so it runs through
fused kernels (cuDNN RNNs) that have no double backward.  Sharing the probe
costs no bias: ``R̂`` is quadratic and ``ξ̂`` linear in ``v``, so their
fluctuations are uncorrelated for symmetric ``v``.

What the perturbed passes contribute.  Write ``z(t)`` for the logits with
every site's input ``h_i`` replaced by ``h_i(1 + t ε^{-1}·ε√(λ_i w_i) v_i)``
(so ``z(±ε)`` are the two probe passes), ``N`` positions, ``p_n =
softmax(z_n(0))``.  Algorithm 2 needs from them only the logit perturbation

    u_n = [z_n(ε) - z_n(-ε)] / (2ε) = J_n(δ) + O(ε²),     δ_i = √(λ_i w_i) v_i ⊙ h_i,   (S1)

(``J_n`` the Jacobian of the logits in the sites' inputs).  Then, with
``ū_n = Σ_c p_nc u_nc`` and ``e_y`` the one-hot target,

    R̂ = (1/N) Σ_n Σ_c p_nc (u_nc - ū_n)² = (1/N) Σ_n u_nᵀ H_out,n u_n          (S2)

is the Hutchinson/finite-difference form of (4.4) (``E_v`` of it is the
λ-weighted ``R_approx``), and

    I = √2 (1/N) Σ_n (p_n - e_{y_n})·u_n = √2 (1/N) Σ_n (ū_n - u_{n,y_n})        (S3)

is ``Σ_i J_loss,i (η_i ⊙ h_i)`` of (4.5)-(4.6) for ``η_i = √(2λ_i w_i) v_i``
(``p - e_y = ∂ℓ/∂z`` is the loss Jacobian in the logits; ``η`` has the
variance ``2λ_i w_i = w_i q_i/(1-q_i)``), so ``ξ̂_approx = ∇_W I`` with the
gradient taken through ``p`` and ``u``, as (4.6) takes it through ``J_loss``
and ``h``.  (S3) is the first-order form of the difference of the perturbed
losses: ``g(t) = L(z(t))`` has ``g'(0) = (1/N) Σ_n (p_n - e_{y_n})·z_n'(0)``,
and both ``[g(ε) - g(-ε)]/(2ε)`` and ``(1/N) Σ_n (p_n - e_{y_n})·u_n`` equal
``g'(0) + O(ε²)``; both are smooth in the parameters, so their gradients
agree to ``O(ε²)`` as well, and either is ``ξ̂_approx + O(ε²)``.  (S3) needs
no softmax on the perturbed logits.

Linear decoder.  When the logits are ``z = W f + b`` of a trailing
``nn.Linear`` (features ``f``), (S1) is

    u_n = W (f_n(ε) - f_n(-ε)) / (2ε)                                             (S4)

exactly (the bias cancels): the perturbed passes stop at the decoder's input,
and one matmul ``(N×d)(d×c)`` replaces two decoders and two softmaxes.
``decoder="auto"`` finds such a decoder in the clean pass and otherwise uses
the full perturbed logits (module docstring of ``analytic_dropout_objective``).

Midpoint (``center="midpoint"``, linear decoder only).  The clean pass can
be dropped: with ``f̄ = (f(ε) + f(-ε))/2 = f(0) + (ε²/2) f''(0) + O(ε⁴)``,

    Z̄ = W f̄ + b = z(0) + O(ε²),                                                   (S7)

and ``L``, ``p`` and (S2)-(S3) evaluated at ``Z̄`` are the clean ones up to
``O(ε²)``, smoothly in the parameters, so every gradient is too; the
backward through ``f̄`` runs through the two perturbed graphs that (S4)
back-propagates anyway.  Two passes through the network instead of three.

Gradients of (S2)-(S3) and of ``L = (1/N) Σ_n ℓ(z_n, y_n)`` in ``Z = z(0)``
and ``u`` (``w_n = u_n - ū_n``, ``R_n = Σ_c p_nc w_nc²``; the outputs' upstream
gradients ``g_L, g_R, g_I``, ``g_I`` for ``I/√2``):

    ∂/∂Z_nk = (1/N) [g_L (p_nk - e_{y_n,k}) + g_R p_nk (w_nk² - R_n) + g_I p_nk w_nk]      (S5)
    ∂/∂u_nk = (1/N) [2 g_R p_nk w_nk + g_I (p_nk - e_{y_n,k})]                            (S6)

(from ``∂R_n/∂u = 2 p ⊙ w``, ``∂R_n/∂p_c = w_c² - ū²`` through the softmax
Jacobian ``diag(p) - ppᵀ``, ``∂(p·u)/∂Z = p ⊙ w``).  ``_LogitHead`` computes
(S2), (S3), ``L`` and (S5)-(S6) in a few fused elementwise passes over the
``N × c`` logits, the cost that dominates a large-vocabulary step.
``hessian="identity"``: ``R_n = ‖u_n‖²/c``, ``∂R_n/∂u = 2u_n/c``, no ``Z`` term.
"""

from __future__ import annotations

import math
import weakref
from typing import Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _common
from ._analytic import (
    SiteNames,
    analytic_mode,
    fixed_eta_policy,
    rademacher,
    selection_active,
    site_generators,
    site_options,
    unlock_positions,
)
from ._common import call_model, check_inputs, default_eps, fd_eps, mean_loss, site_weight_list
from ._errors import DropcheckError
from ._explicit import fd_pair


class AnalyticObjective(NamedTuple):
    """``objective``: differentiate it for the Algorithm 2 update;
    ``loss``: the clean mean loss; ``explicit``: the ``R̂_approx`` sample
    (λ-weighted, before ``explicit_weight``); ``implicit_probe``: the
    zero-mean term whose gradient is ``ξ̂_approx`` (its value is noise)."""

    objective: torch.Tensor
    loss: torch.Tensor
    explicit: torch.Tensor
    implicit_probe: torch.Tensor


# --------------------------------------------------------------------------
# the logit-space part: L, R̂ (S2), I/√2 (S3) and their gradients (S5)-(S6)


def _head_buffers(Z, u, W, y, hessian):
    """The forward of ``_LogitHead``: ``(L, p, w, third, R_n, I_n)`` with
    ``third = p ⊙ w`` (``hessian="output"``) or ``u`` (``"identity"``)."""
    N, c = Z.shape
    logp = torch.log_softmax(Z, -1)
    loss = -logp.gather(1, y[:, None]).sum() / N
    p = logp.exp_()  # in place: log p is not needed any more
    del logp
    owned = W is not None
    if owned:
        u = F.linear(u, W)  # (S4) from Δ: a new buffer, reused for w below
    ubar = torch.einsum("nc,nc->n", p, u)
    if hessian == "identity":  # ‖u‖²/c; (S6) needs u itself
        R_n = torch.einsum("nc,nc->n", u, u) / c
        w = u - ubar[:, None]
        third = u if owned else u.clone()  # the backward writes into it
    else:
        w = u.sub_(ubar[:, None]) if owned else u - ubar[:, None]
        third = p * w
        R_n = torch.einsum("nc,nc->n", third, w)  # Σ p (u - ū)², the centred form (_common.quad_form)
    I_n = -w.gather(1, y[:, None]).squeeze(1)  # (p - e_y)·u = ū - u_y = -w_y
    return loss, p, w, third, R_n, I_n


class _LogitHead(torch.autograd.Function):
    """``(L, R̂, I/√2)`` from clean logits ``Z (N, c)``, targets ``y (N,)`` and
    the logit perturbation: ``u (N, c)`` itself (``W`` None), or ``u = Δ Wᵀ``
    from the decoder-input difference ``Δ (N, d)`` and the decoder weight
    ``W (c, d)`` (S4), computed here so that its buffer is reused for ``w``.
    Backward by (S5)-(S6) (module docstring), with ``∂/∂Δ = (∂/∂u) W`` and
    ``∂/∂W = (∂/∂u)ᵀ Δ`` for (S4).  Kept for the backward: ``p``,
    ``w = u - ū`` and ``p ⊙ w`` (three ``N × c`` tensors; ``log p`` becomes
    ``p`` in place), and the inputs.  The first backward writes (S5) into
    ``w``'s buffer and (S6) into ``p ⊙ w``'s, so a large-vocabulary step
    allocates no further ``N × c`` tensor; a later backward through the same
    graph (``retain_graph=True``, or ``loss`` differentiated after
    ``objective``) recomputes the buffers from the inputs."""

    @staticmethod
    def forward(ctx, Z, u, W, y, hessian):
        N = Z.shape[0]
        loss, p, w, third, R_n, I_n = _head_buffers(Z, u, W, y, hessian)
        ctx.save_for_backward(Z, u, W, y)
        # kept as attributes, not saved tensors: the first backward overwrites w and third
        ctx.buffers = (p, w, third, R_n)
        ctx.hessian = hessian
        ctx.set_materialize_grads(False)
        return loss, R_n.sum() / N, I_n.sum() / N

    @staticmethod
    def backward(ctx, gL, gR, gI):
        Z, delta, W, y = ctx.saved_tensors
        if ctx.buffers is None:  # consumed by an earlier backward: recompute
            with torch.no_grad():
                p, w, third, R_n = _head_buffers(Z.detach(), delta.detach(), None if W is None else W.detach(), y,
                                                 ctx.hessian)[1:5]
        else:
            p, w, third, R_n = ctx.buffers
            ctx.buffers = None
        N, c = p.shape
        rows = y[:, None]
        identity = ctx.hessian == "identity"
        # upstream gradients over N, kept as 0-dim tensors (no host sync on a GPU)
        sL = None if gL is None else gL / N
        sR = None if gR is None else gR / N
        sI = None if gI is None else gI / N
        need_Z = ctx.needs_input_grad[0]
        need_u = ctx.needs_input_grad[1] or (W is not None and ctx.needs_input_grad[2])
        GZ = Gu = dU = dW = None
        # (S5) goes into w's buffer, then (S6) into third's (p ⊙ w, or u for identity): no new N × c buffer
        if need_Z and (sL is not None or sI is not None or (sR is not None and not identity)):
            # (S5): (p ⊙ w) ⊙ (g_R w + g_I) + p ⊙ (g_L - g_R R_n) - g_L e_y   (identity: no g_R term)
            if sR is not None and not identity:
                GZ = w.mul_(sR)
                if sI is not None:
                    GZ.add_(sI)
                GZ.mul_(third)
                base = -sR * R_n
                if sL is not None:
                    base = base + sL
                GZ.addcmul_(p, base[:, None])
            elif sI is not None:
                GZ = w.mul_(sI)
                if sL is not None:
                    GZ.add_(sL)
                GZ.mul_(p)
            else:
                GZ = w.copy_(p).mul_(sL)
            if sL is not None:
                GZ.scatter_add_(1, rows, (-sL).to(GZ.dtype).expand(N, 1))
        if need_u and (sR is not None or sI is not None):
            # (S6): 2 g_R p ⊙ w + g_I (p - e_y)   (identity: 2 g_R u / c + g_I (p - e_y))
            if sR is not None:
                Gu = third.mul_(2.0 * sR / c if identity else 2.0 * sR)
                if sI is not None:
                    Gu.addcmul_(p, sI)
            else:
                Gu = third.copy_(p).mul_(sI)
            if sI is not None:
                Gu.scatter_add_(1, rows, (-sI).to(Gu.dtype).expand(N, 1))
            if W is None:
                dU = Gu
            else:
                dU = Gu @ W if ctx.needs_input_grad[1] else None
                dW = Gu.t() @ delta if ctx.needs_input_grad[2] else None
        return GZ, dU, dW, None, None


def logit_head(Z: torch.Tensor, u: torch.Tensor, y: torch.Tensor, hessian: str = "output",
               W: Optional[torch.Tensor] = None):
    """``(L, R̂, I/√2)`` of the module docstring ((S2), (S3); ``L`` the mean
    cross-entropy), differentiable by (S5)-(S6).  ``W`` given: ``u`` is the
    decoder-input difference ``Δ`` and the perturbation is ``Δ Wᵀ`` (S4)."""
    return _LogitHead.apply(Z, u, W, y, hessian)


# --------------------------------------------------------------------------
# the trailing linear decoder


class _StopAtDecoder(BaseException):
    """Ends a perturbed pass at the decoder's input (a ``BaseException``, so a
    model's own ``except Exception`` does not swallow it)."""


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


class _DecoderWatch:
    """Hooks on candidate ``nn.Linear`` modules during the clean pass: records
    each one's calls, its last input and output, and how many site
    occurrences had been recorded when it started."""

    def __init__(self, session, modules):
        self.session = session
        self.calls: dict[int, int] = {}
        self.last = None  # (module, input, output, occurrences before the call)
        self._start: dict[int, int] = {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, m, args):
        self._start[id(m)] = (len(self.session.occurrences), m.weight, m.bias)

    def _post(self, m, args, out):
        self.calls[id(m)] = self.calls.get(id(m), 0) + 1
        self.last = (m, args[0] if args else None, out, self._start.get(id(m), (-1, None, None)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def decoder(self, logits: torch.Tensor, n_occ: int) -> tuple[Optional[nn.Module], str]:
        """``(module, "")`` when the last watched module produced ``logits``
        (the very tensor the model returned), ran once, and every site ran
        before it; else ``(None, why)``."""
        if self.last is None:
            return None, "no nn.Linear ran in the forward pass"
        m, f, out, (start, weight, bias) = self.last
        if out is not logits:
            return None, "the model's logits are not the output of its last nn.Linear call"
        if self.calls.get(id(m), 0) != 1:
            return None, "the decoder nn.Linear is called more than once per forward pass"
        if start != n_occ:
            return None, "a dropout site runs inside or after the decoder"
        if not isinstance(f, torch.Tensor) or f.shape[-1] != m.in_features:
            return None, "the decoder's input is not one tensor of its in_features"
        if not isinstance(weight, nn.Parameter) or not (bias is None or isinstance(bias, nn.Parameter)):
            # e.g. WeightDrop/DropConnect on the decoder: its weight differs between the passes
            return None, "the decoder's weight or bias in the forward pass is not its own parameter"
        return m, ""


def _decoder_features(model: nn.Module, inputs, decoder: nn.Module, policy, n_occ: Optional[int]) -> Optional[torch.Tensor]:
    """The decoder's input in a pass with ``policy`` at the sites; the pass
    ends there (nothing after the decoder is computed).  ``None`` if the
    decoder's parameters are not the ones it used in the clean pass."""
    captured = []
    weight, bias = decoder.weight, decoder.bias
    calls = [0]

    def counted(occ):
        calls[0] += 1
        return policy(occ)

    def pre(m, args):
        captured.append(args[0] if (m.weight is weight and m.bias is bias) else None)
        raise _StopAtDecoder

    handle = decoder.register_forward_pre_hook(pre)
    try:
        with analytic_mode(model, counted):
            try:
                call_model(model, inputs)
            except _StopAtDecoder:
                pass
    finally:
        handle.remove()
    if not captured or (n_occ is not None and calls[0] != n_occ):
        raise DropcheckError(
            "a perturbed pass did not call the same dropout sites before the decoder as the clean pass; "
            "dropcheck needs the same sites to be called in every forward pass"
        )
    return captured[0]


def _rows(t: torch.Tensor, N: int) -> Optional[torch.Tensor]:
    """``(..., d)`` per-position features -> the ``N`` rows the clean logits
    kept (``None`` if that selection is not known)."""
    t = t.reshape(-1, t.shape[-1])
    if t.shape[0] == N:
        return t
    select = getattr(_common, "select_rows", None)  # positions dropped by flatten_logits (ignore_index)
    if select is None:
        return None
    try:
        return select(t, N)
    except DropcheckError:
        return None


# decoders found by decoder="auto": model -> (module fingerprint, decoder or None)
_FOUND: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(id(m) for m in model.modules())


def _auto_decoder(model: nn.Module, inputs) -> Optional[nn.Module]:
    """The trailing linear decoder of ``model`` (``None`` if it has none), from
    a forward-only clean pass on ``inputs``; cached per model."""
    fp = _fingerprint(model)
    hit = _FOUND.get(model)
    if hit is not None and hit[0] == fp:
        return hit[1]
    with torch.no_grad(), analytic_mode(model, None) as session:
        watch = _DecoderWatch(session, [m for m in model.modules() if _is_plain_linear(m)])
        try:
            logits = call_model(model, inputs)
        finally:
            watch.remove()
    found = watch.decoder(logits, len(session.occurrences))[0]
    if not selection_active():  # sites left out of this call could run after the decoder
        _FOUND[model] = (fp, found)
    return found


def _midpoint_objective(model, inputs, targets, dec, *, explicit_weight, implicit_weight, hessian, generator, eps,
                        site_weights, independent_positions) -> AnalyticObjective:
    """``center="midpoint"``: two passes ``h(1 ± ε√(λw) v)`` to the decoder's
    input; ``L`` and ``p`` at ``f̄ = (f⁺ + f⁻)/2`` (module docstring, (S7))."""
    W, b = dec.weight, dec.bias
    if not isinstance(W, nn.Parameter) or not (b is None or isinstance(b, nn.Parameter)):
        raise DropcheckError("decoder: its weight and bias must be its own parameters for center='midpoint'")
    eps = fd_eps(eps, W.dtype)
    if not eps > 0:
        raise DropcheckError(f"eps must be > 0, got {eps!r}")
    gens = site_generators(generator)
    occs, etas = [], []

    def draw(occ):  # the probes of the clean route, drawn in the same order, during the + pass
        if independent_positions and occ.site.structure == "locked":
            occ.mask_shape = tuple(occ.h.shape)
        w = 1.0 if site_weights is None else float(site_weights.get(occ.key, site_weights.get(occ.site.name, 1.0)))
        if not (w >= 0.0) or w == float("inf"):
            site_weight_list([occ], {occ.key: w})  # raises with the usual message
        eta = math.sqrt(occ.site.lam * w) * rademacher(occ.mask_shape, occ.h, gens(occ))
        occs.append(occ)
        etas.append(eta)
        return eps * occ.expand(eta.to(occ.h.dtype)) * occ.h

    fp = _decoder_features(model, inputs, dec, draw, None)
    if occs:
        site_weight_list(occs, site_weights)  # unknown site names are an error, as in the clean route
    fm = _decoder_features(model, inputs, dec, fixed_eta_policy(etas, -eps), len(etas))
    if fp is None or fm is None:
        raise DropcheckError("decoder: its weight or bias differs between the passes (e.g. DropConnect on it)")
    Z, y = _common.flatten_logits(F.linear((fp + fm) / 2.0, W, b), targets)
    delta = _rows((fp - fm) / (2.0 * eps), Z.shape[0])
    del fp, fm
    if delta is None:
        raise DropcheckError("decoder: the decoder's input rows do not match the logits' positions")
    loss, explicit, implicit = logit_head(Z, delta, y, hessian, W=W)
    return _assemble(loss, explicit, implicit, explicit_weight, implicit_weight)


def _assemble(loss, explicit, implicit, explicit_weight, implicit_weight) -> AnalyticObjective:
    implicit = math.sqrt(2.0) * implicit  # η = sqrt(2λw) v: the probe's u times √2 (S3)
    objective = loss
    if explicit_weight != 0:
        objective = objective + explicit_weight * explicit
    if implicit_weight != 0:
        objective = objective + implicit_weight * implicit
    return AnalyticObjective(objective, loss, explicit, implicit)


# --------------------------------------------------------------------------


@site_options
def analytic_dropout_objective(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    *,
    explicit_weight: float = 1.0,
    implicit_weight: float = 1.0,
    hessian: str = "output",
    generator: Union[torch.Generator, int, None, Mapping] = None,
    eps: Optional[float] = None,
    site_weights: Optional[Mapping[str, float]] = None,
    independent_positions: bool = False,
    decoder: Union[str, nn.Module, None] = "auto",
    center: str = "clean",
    sites: Optional[SiteNames] = None,
) -> AnalyticObjective:
    """Surrogate of Algorithm 2 (``L + λ₁R_approx`` plus ``λ₂ξ_approx``) by
    finite differences; see the module docstring.  ``explicit_weight`` and
    ``implicit_weight`` multiply the derived defaults (λ_i per site, and the
    noise with variance ``q/(1-q)``); 0 switches a term off (its passes are
    still run when the other needs them; ``implicit_weight=0`` is the
    explicit-only rule ``L + λR_approx``).  ``site_weights`` ``w_i`` multiply
    the sites' explicit terms (probe scale ``sqrt(λ_i w_i)``); since both
    terms share the probe, site ``i``'s noise is then scaled by ``sqrt(w_i)``
    (use ``explicit_regularizer`` + ``implicit_noise`` for independent
    per-site coefficients).  ``independent_positions=True`` draws one probe
    per position and unit at locked sites (the official code's per-position
    treatment of locked dropout) instead of one per sequence.  Bias ``O(ε²)``.

    ``decoder``: ``"auto"`` (default) uses (S4) when the logits the model
    returns are the output of its last ``nn.Linear`` call (a plain
    ``nn.Linear``, called once per pass, after every dropout site), else
    silently the full perturbed logits (S1); ``None`` always uses (S1);
    an ``nn.Linear`` module requires (S4) with that module and raises
    ``DropcheckError`` saying why when it does not apply.  Both give the
    same ``u`` up to rounding.  The first pass is always the complete clean
    forward pass (a stateful model's hidden state can be read from it); the
    perturbed passes stop at the decoder's input under (S4).

    ``center``: ``"clean"`` (default) evaluates ``L`` and ``p`` on the clean
    pass; ``"midpoint"`` runs no clean pass and evaluates them at the mean
    of the perturbed passes' decoder inputs (S7), which changes ``L``, ``R̂``,
    ``ξ̂`` and every gradient by ``O(ε²)`` and saves one pass through the
    network.  It needs the linear decoder: ``decoder="auto"`` finds it with
    one forward-only pass on the first call for a model (cached; without
    one, ``center`` is ignored and the clean route runs); a given
    ``nn.Linear`` is taken to produce the logits (nothing after it is run).
    A stateful model's hidden state is then best read from the perturbed
    passes (their mean is the clean one up to ``O(ε²)``).

    ``sites`` (site names, occurrence keys ``"name#1"`` or ``SiteSpec``s;
    default all): the sites that are probed in (S1); the others are the
    identity in every pass, as if their ``q`` were 0 (no probe, no draw), so
    the result equals that of the model with their ``q`` set to 0.
    ``generator`` may map site names or keys to generators (or seeds): each
    site's probe ``v_i`` is then drawn from its own stream (``SiteGenerators``),
    e.g. whole-batch sites from a generator seeded alike on every rank under
    data parallelism.  Unknown names raise ``DropcheckError``.
    """
    if hessian not in ("output", "identity"):
        raise DropcheckError(f"unknown hessian {hessian!r}; expected 'output' or 'identity'")
    if not (decoder is None or decoder == "auto" or isinstance(decoder, nn.Module)):
        raise DropcheckError(f"decoder must be 'auto', None or an nn.Linear module, got {decoder!r}")
    if isinstance(decoder, nn.Module) and not _is_plain_linear(decoder):
        raise DropcheckError(f"decoder must be a plain nn.Linear, got {type(decoder).__name__}")
    if decoder is not None and decoder != "auto" and not any(m is decoder for m in model.modules()):
        raise DropcheckError("decoder is not a module of the model")

    if center not in ("clean", "midpoint"):
        raise DropcheckError(f"center must be 'clean' or 'midpoint', got {center!r}")
    check_inputs(inputs)
    if center == "midpoint" and decoder is not None and not (explicit_weight == 0 and implicit_weight == 0):
        dec = decoder if isinstance(decoder, nn.Module) else _auto_decoder(model, inputs)
        if dec is not None:
            return _midpoint_objective(model, inputs, targets, dec, explicit_weight=explicit_weight,
                                       implicit_weight=implicit_weight, hessian=hessian, generator=generator,
                                       eps=eps, site_weights=site_weights,
                                       independent_positions=independent_positions)
    watched = []
    if decoder == "auto":
        watched = [m for m in model.modules() if _is_plain_linear(m)]
    elif decoder is not None:
        watched = [decoder]
    with analytic_mode(model, None) as session:
        watch = _DecoderWatch(session, watched) if watched else None
        try:
            logits = call_model(model, inputs)
        finally:
            if watch is not None:
                watch.remove()
    Z0, y = _common.flatten_logits(logits, targets)
    occs = session.occurrences
    n_occ = len(occs)
    head, why = (None, "decoder=None") if watch is None else watch.decoder(logits, n_occ)
    if decoder == "auto" and not selection_active():
        _FOUND[model] = (_fingerprint(model), head)
    if watch is not None:
        watch.last = None  # do not keep the clean pass's tensors alive
    if independent_positions:
        unlock_positions(occs)
    eps = fd_eps(eps, Z0.dtype)
    if not eps > 0:
        raise DropcheckError(f"eps must be > 0, got {eps!r}")
    if head is None and isinstance(decoder, nn.Module):
        raise DropcheckError(f"decoder: the linear-decoder route does not apply: {why}")
    if explicit_weight == 0 and implicit_weight == 0:
        loss = mean_loss(Z0, y)
        zero = loss.new_zeros(())
        return AnalyticObjective(loss, loss, zero, zero)
    gens = site_generators(generator)
    ws = site_weight_list(occs, site_weights)
    etas = [math.sqrt(o.site.lam * w) * rademacher(o.mask_shape, o.h, gens(o)) for o, w in zip(occs, ws)]
    delta = None
    if head is not None:  # (S4): stop at the decoder's input
        fs = [_decoder_features(model, inputs, head, fixed_eta_policy(etas, s * eps), n_occ) for s in (1.0, -1.0)]
        delta = None if fs[0] is None or fs[1] is None else _rows((fs[0] - fs[1]) / (2.0 * eps), Z0.shape[0])
        del fs
        if delta is None and isinstance(decoder, nn.Module):
            raise DropcheckError("decoder: the decoder's parameters or input rows differ between the passes")
        if delta is not None:
            loss, explicit, implicit = logit_head(Z0, delta, y, hessian, W=head.weight)
    if delta is None:  # (S1) from the full perturbed logits
        zp, zm = fd_pair(model, inputs, etas, eps, Z0.shape)
        loss, explicit, implicit = logit_head(Z0, (zp - zm) / (2.0 * eps), y, hessian)
        del zp, zm
    return _assemble(loss, explicit, implicit, explicit_weight, implicit_weight)
