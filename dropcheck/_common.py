"""Shared plumbing: calling the model, checking inputs, the loss."""

from __future__ import annotations

import contextvars
import math
import functools
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import DropcheckError
from ._session import current_session

ESTIMATORS = ("exact", "sampled", "hutchinson", "fd")


def _invoke(model: nn.Module, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def extract_logits(out) -> torch.Tensor:
    """The logits in a model's output: a tensor; a Hugging Face ``ModelOutput``
    (its ``.logits``); a dict with ``"logits"``; or the first element of a
    tuple/list (e.g. an RNN's ``(logits, hidden)``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and len(out):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise DropcheckError(
            f"the model must return logits: a tensor, an object with .logits (Hugging Face ModelOutput), a dict "
            f"with 'logits' or a tuple starting with them; got {type(out).__name__}"
        )
    return logits


def _input_tensors(inputs):
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]


def check_input_dtypes(model: nn.Module, inputs) -> None:
    """Floating-point inputs must have the dtype of the model's floating-point
    parameters (a float32 batch into a float64 model is an error here, not a
    silent cast or a torch error deep inside the model)."""
    want = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if want is None:
        return
    for t in _input_tensors(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != want:
            raise DropcheckError(
                f"inputs have dtype {t.dtype} but the model's parameters are {want}; convert one of them "
                f"(model.to({want}) or inputs.to({want}))"
            )


def call_model(model: nn.Module, inputs) -> torch.Tensor:
    """The logits of ``model(inputs)``: ``model(**inputs)`` for a dict (e.g.
    ``input_ids`` and ``attention_mask``), ``model(*inputs)`` for a tuple,
    ``model(inputs)`` otherwise; the output as ``extract_logits`` reads it.
    Inside ``analytic_mode`` the pass is checked for unmodelled randomness."""
    check_input_dtypes(model, inputs)
    session = current_session(model)
    if session is None:
        return extract_logits(_invoke(model, inputs))
    return extract_logits(session.run_pass(lambda: _invoke(model, inputs)))


class Estimate(tuple):
    """``(value, stderr)`` of a stochastic estimator called with
    ``return_stderr=True``: ``value`` is what the call returns otherwise (a
    scalar tensor, differentiable where the call's result is), ``stderr``
    the standard error of the mean over its ``samples`` independent draws
    (a float, from the draws' sample standard deviation)."""

    def __new__(cls, value, stderr: float, samples: int):
        obj = super().__new__(cls, (value, float(stderr)))
        obj.samples = int(samples)
        return obj

    @property
    def value(self):
        return self[0]

    @property
    def stderr(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        v = float(self[0].detach()) if isinstance(self[0], torch.Tensor) else self[0]
        return f"Estimate(value={v!r}, stderr={self[1]!r}, samples={self.samples})"


def with_stderr(value, draws, factors, samples: int, per_site: bool, keys):
    """``value`` (a scalar, or ``{key: scalar}``) wrapped as ``Estimate``s from
    the per-draw, per-site values ``draws[s][j]`` and the sites' weights
    ``factors[j]`` (λ_i and site weights): the total's draws are
    ``Σ_j factors[j] draws[s][j]``."""
    import math as _m

    if samples < 2:
        raise DropcheckError(f"return_stderr needs samples >= 2 draws, got {samples}")
    D = torch.tensor(draws, dtype=torch.float64) * torch.tensor(factors, dtype=torch.float64)
    se = D.std(0, unbiased=True) / _m.sqrt(samples)
    if per_site:
        return {k: Estimate(value[k], float(se[j]), samples) for j, k in enumerate(keys)}
    return Estimate(value, float(D.sum(1).std(unbiased=True)) / _m.sqrt(samples), samples)


_VALUE_CHECKS = contextvars.ContextVar("dropcheck_value_checks", default=True)


class value_checks:
    """``with dropcheck.value_checks(False):`` skips the checks that read
    tensor *values* (non-finite inputs/logits, target range).  Each of them
    is a device-to-host sync on a GPU; a training loop that has validated
    its data may turn them off.  Shape and name checks always run."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)

    def __enter__(self):
        self._token = _VALUE_CHECKS.set(self.enabled)
        return self

    def __exit__(self, *exc):
        _VALUE_CHECKS.reset(self._token)
        return False


def check_inputs(inputs) -> None:
    if not _VALUE_CHECKS.get():
        return
    for t in _input_tensors(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DropcheckError("inputs contain non-finite values (NaN or inf)")


IGNORE_INDEX = -100  # PyTorch's and Hugging Face's default


class _Selection:
    """Rows kept by the last ``flatten_logits`` (``ignore_index`` dropped)."""

    def __init__(self, total: int, index: torch.Tensor):
        self.total = total
        self.index = index


_SELECTION: contextvars.ContextVar = contextvars.ContextVar("dropcheck_selection", default=None)


def flatten_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., c)`` logits and ``(...)`` class indices -> ``(N, c)``, ``(N,)``.

    Positions whose target is ``ignore_index`` (-100, as in PyTorch and
    Hugging Face) are dropped, so every mean of dropcheck (loss, regularizer,
    noise) is over the remaining ``N`` positions.  (With
    ``value_checks(False)`` on a GPU the targets are not read, to avoid a
    sync: there they must not contain -100.)
    """
    if not isinstance(targets, torch.Tensor):
        raise DropcheckError(f"targets must be a tensor of class indices, got {type(targets).__name__}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise DropcheckError(
            f"logits of shape {tuple(logits.shape)} do not match targets of shape "
            f"{tuple(targets.shape)}: expected logits (*targets.shape, classes)"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise DropcheckError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.numel() == 0:
        raise DropcheckError(f"empty batch: targets of shape {tuple(targets.shape)} hold no position")
    c = logits.shape[-1]
    Z, y = logits.reshape(-1, c), targets.reshape(-1)
    _SELECTION.set(None)
    checks = _VALUE_CHECKS.get()
    if checks or y.device.type == "cpu":
        ignored = y == IGNORE_INDEX
        if bool(ignored.any()):
            keep = (~ignored).nonzero().squeeze(1)
            if keep.numel() == 0:
                raise DropcheckError(f"empty batch: every target is ignore_index={IGNORE_INDEX}")
            _SELECTION.set(_Selection(y.shape[0], keep))
            Z, y = Z[keep], y[keep]
    if not checks:
        return Z, y
    if y.min() < 0 or y.max() >= c:
        raise DropcheckError(
            f"targets must lie in [0, {c}) (or be ignore_index={IGNORE_INDEX}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    if not torch.isfinite(Z).all():
        raise DropcheckError("the model produced non-finite logits (NaN or inf)")
    # the second-order terms multiply logits (and their derivatives) pairwise: past the square root of the
    # dtype's largest number those products overflow to inf, and inf·0 gives NaN
    big, lim = float(Z.detach().abs().max()), math.sqrt(float(torch.finfo(Z.dtype).max))
    if big > lim:
        raise DropcheckError(f"the model's logits reach {big:.3g}, beyond what {Z.dtype} can square ({lim:.3g}): "
                             "the second-order terms would overflow to inf/NaN; rescale the model or use float64")
    return Z, y


def select_rows(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """``(N_all, c)`` logits of a later pass on the same batch -> the ``rows``
    rows that the last ``flatten_logits`` kept (``ignore_index`` dropped)."""
    Z = logits.reshape(-1, logits.shape[-1])
    if Z.shape[0] == rows:
        return Z
    sel = _SELECTION.get()
    if sel is None or sel.total != Z.shape[0] or sel.index.numel() != rows:
        raise DropcheckError(
            f"a perturbed pass gave {Z.shape[0]} positions where the clean pass kept {rows}"
        )
    return Z[sel.index]


def mean_loss(Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``ℓ(z, y) = -log softmax(z)_y`` over positions."""
    return F.cross_entropy(Z, y)


def named_params(model: nn.Module, params: Optional[Sequence[str]] = None) -> list[tuple[str, torch.Tensor]]:
    """The parameters a gradient is taken in: all that require grad, or the named ones."""
    all_named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        if not all_named:
            raise DropcheckError("the model has no parameter that requires grad")
        return all_named
    d = dict(all_named)
    missing = [n for n in params if n not in d]
    if missing:
        raise DropcheckError(f"no trainable parameter(s) named {missing}; the model has {sorted(d)}")
    return [(n, d[n]) for n in params]


def check_estimator(estimator: str, allowed: Sequence[str]) -> None:
    if estimator not in allowed:
        raise DropcheckError(f"unknown estimator {estimator!r}; expected one of {list(allowed)}")


def default_eps(dtype: torch.dtype) -> float:
    """Central-difference step: cube root of the dtype's machine epsilon
    (balances O(ε²) truncation against O(u/ε) rounding): 6.1e-6 in float64,
    4.9e-3 in float32, 0.2 in bfloat16."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def fd_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """The central-difference step to use: ``default_eps(dtype)`` for None,
    else ``eps`` if the dtype resolves it.  The probes scale a site by
    ``1 ± ε·η``; below the dtype's machine epsilon ``1 ± ε`` rounds to 1, both
    passes are the clean one and the difference is identically zero (a
    regularizer that silently vanishes), so such an ``eps`` is an error."""
    if eps is None:
        return default_eps(dtype)
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise DropcheckError(f"eps must be > 0 and finite, got {eps!r}")
    res = float(torch.finfo(dtype).eps)
    if eps < res:
        raise DropcheckError(f"eps={eps:g} is below what {dtype} resolves ({res:.3g}): 1 ± eps rounds to 1 and the "
                             f"finite difference is identically zero; use at least {res:.3g} (the default for "
                             f"{dtype} is {default_eps(dtype):.3g})")
    return eps


def fd_step_and_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """Central-difference step and the agreement to expect for a model that
    computes in ``dtype``: ``ε = u^(1/3)`` (``default_eps``) balances the
    ``O(ε²)`` truncation against the ``O(u/ε)`` rounding, both then of order
    ``u^(2/3)``; the tolerance allows a factor 100 for the derivatives'
    constants, floored at 1e-6: 1e-6 in float64, 2.4e-3 in float32."""
    u = float(torch.finfo(dtype).eps)
    return u ** (1.0 / 3.0), max(1e-6, 100.0 * u ** (2.0 / 3.0))


def quad_form(p: torch.Tensor, u: torch.Tensor, hessian: str = "output") -> torch.Tensor:
    """``uᵀ H u`` per row with ``p`` of shape ``(N, c)`` and ``u`` of shape
    ``(N, c, ...)`` (extra trailing dims allowed).

    ``hessian="output"``: ``H_out = diag(p) - ppᵀ``, so
    ``uᵀHu = Σ_c p_c u_c² - (Σ_c p_c u_c)² = Σ_c p_c (u_c - ū)²`` without forming ``H``
    (the centred form, which does not cancel when the softmax saturates).
    ``hessian="identity"``: the Section 5.2 ablation ``‖u‖²/c`` (the official
    code's normalisation).
    """
    if hessian == "output":
        # Σ p (u - ū)², ū = Σ p u: equal since Σ p = 1, but it never cancels
        # (the difference form lost 1e-6 relative in float64 at logit gaps ~40)
        pe = p.reshape(p.shape + (1,) * (u.dim() - 2))
        ubar = (pe * u).sum(1, keepdim=True)
        return (pe * (u - ubar) ** 2).sum(1)
    if hessian == "identity":
        return (u * u).sum(1) / u.shape[1]
    raise DropcheckError(f"unknown hessian {hessian!r}; expected 'output' or 'identity'")


_OUTER_GRAD = contextvars.ContextVar("dropcheck_outer_grad", default=True)


def needs_graph(model: nn.Module) -> bool:
    """Whether results must stay differentiable in the parameters: the
    caller had autograd on and some parameter requires grad."""
    return _OUTER_GRAD.get() and any(p.requires_grad for p in model.parameters())


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, Estimate):
        return Estimate(_detach(out.value), out.stderr, out.samples)
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    return out


def grad_aware(fn):
    """The estimators differentiate internally, so they run with autograd on
    even inside ``torch.no_grad()``; the caller's mode decides only whether the
    result keeps its graph (``needs_graph``) or comes back detached."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = torch.is_grad_enabled()
        token = _OUTER_GRAD.set(outer and _OUTER_GRAD.get())
        try:
            with torch.enable_grad():
                out = fn(*args, **kwargs)
        finally:
            _OUTER_GRAD.reset(token)
        return out if outer else _detach(out)

    return wrapper


def site_weight_list(occs, site_weights) -> list[float]:
    """Per-occurrence multipliers from ``site_weights``: a mapping from a site
    key (``"name"``, ``"name#1"``) or a module name (all its calls) to a
    non-negative float; sites not named get 1.  Unknown names are an error."""
    if site_weights is None:
        return [1.0] * len(occs)
    known = {o.key for o in occs} | {o.site.name for o in occs}
    unknown = sorted(set(site_weights) - known)
    if unknown:
        raise DropcheckError(f"site_weights names unknown site(s) {unknown}; the sites are {sorted(known)}")
    out = []
    for o in occs:
        w = site_weights.get(o.key, site_weights.get(o.site.name, 1.0))
        w = float(w)
        if not (w >= 0.0) or w != w or w == float("inf"):
            raise DropcheckError(f"site_weights[{o.key!r}] must be a finite number >= 0, got {w!r}")
        out.append(w)
    return out
