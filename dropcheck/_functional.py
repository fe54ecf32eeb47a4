"""Dropout without a module of its own: functional calls and attention.

While an analytic forward pass runs, a ``torch.overrides.TorchFunctionMode``
sees every torch call the model makes.  It turns

- ``F.dropout``, ``torch.dropout`` (per position), ``F.dropout1d/2d/3d``,
  ``torch.feature_dropout`` (per channel) into sites whose input is the
  tensor being dropped;
- ``F.scaled_dot_product_attention(q, k, v, dropout_p=p)`` into the plain
  formula ``softmax(q kᵀ · scale + mask) v`` with a site on the attention
  probabilities (the fused kernels have no double backward; this path has,
  so the Hutchinson, Taylor and ``ξ_approx`` autograd routes work; it is
  taken for every call, ``dropout_p = 0`` included);
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) into its
  own Python body run under the mode, so that its attention dropout, a
  ``F.dropout`` or ``scaled_dot_product_attention`` call inside, becomes a
  site too;

each named after the module that made the call (the innermost module of the
model on the Python stack) and the attribute that holds its drop
probability (``site_name``), e.g. ``"model.layers.0.self_attn:attention_dropout"``,
``"model.encoder.layers.0:activation_dropout"``.  Calls with
``training=False`` or ``p = 0`` are the identity.

A model copy made by ``with_drop_probability`` carries per-site drop
probabilities for its functional sites; ``OverrideMode`` applies them to the
model's own forward passes (outside dropcheck's analytic passes, where
``AnalyticSession.functional_site`` applies them).

Everything else random is refused with an error naming the module:
``torch.rand*``, ``bernoulli``, ``Tensor.uniform_``, alpha dropout, RReLU in
training, ... (noise dropcheck cannot describe as multiplicative
mean-one noise would otherwise be silently left in).
"""

from __future__ import annotations

import linecache
import math
import os
import re
import sys
import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._errors import DropcheckError
from ._session import functional_override, session_covering

# --------------------------------------------------------------------------
# naming a functional site


def module_caller(names: dict, frame) -> tuple:
    """``(name, module)`` of the innermost module of the model on the Python
    stack from ``frame`` up (a frame whose ``self`` or ``module`` local is
    one of the model's modules; ``names`` maps ``id(module)`` to its
    qualified name), or ``(None, None)`` outside the model's forward pass."""
    f = frame
    while f is not None:
        loc = f.f_locals
        for k in ("self", "module"):
            m = loc.get(k)
            if m is not None and id(m) in names:
                return names[id(m)], m
        f = f.f_back
    return None, None


_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_KIT_DIR = os.path.join(_OWN_DIR, "testing")


def _call_frame(frame):
    """The frame of the model's code that made a dropout call: the first
    frame from ``frame`` up that is neither torch's nor dropcheck's own
    (dropcheck.testing's example networks count as model code)."""
    f = frame
    while f is not None:
        mod = f.f_globals.get("__name__", "") or ""
        fn = f.f_code.co_filename
        own = fn.startswith(_OWN_DIR) and not fn.startswith(_KIT_DIR)
        if not (mod == "torch" or mod.startswith("torch.") or own):
            return f
        f = f.f_back
    return None


_DROPISH = re.compile(r"drop|^p$")
_REF = re.compile(r"\b(?:self|module)\.(?:config\.)?([A-Za-z_]\w*)")
# module -> {(code, line, q): attribute}; weakly keyed, so that a module freed and another made at the same
# address (the same id) never inherits its names (an id-keyed cache did, which named sites after another
# model's attributes depending on test order)
_NAME_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _q_of(value) -> Optional[float]:
    """The drop probability an attribute holds: a float, or a dropout module's ``p``."""
    if isinstance(value, torch.nn.Module):
        value = getattr(value, "p", None)
    if isinstance(value, bool) or not isinstance(value, (float, int)):
        return None
    return float(value)


def _same(a: Optional[float], q: float) -> bool:
    return a is not None and abs(a - q) <= 1e-12 * max(1.0, abs(q))


def _call_text(frame) -> str:
    """The source of the call at ``frame``'s line (continued until its
    parentheses close, at most 8 lines)."""
    fn, ln = frame.f_code.co_filename, frame.f_lineno
    text, depth = "", 0
    for k in range(8):
        line = linecache.getline(fn, ln + k)
        if not line:
            break
        text += line
        depth += line.count("(") - line.count(")")
        if depth <= 0:
            break
    return text


def q_attribute(module, frame, q: float) -> Optional[str]:
    """The attribute (or config key) of ``module`` that holds the drop
    probability ``q`` of a functional dropout call made at ``frame``:

    1. an attribute named in the call's source (``p=self.activation_dropout``,
       ``self.config.attention_dropout``) whose value is ``q``;
    2. else the only dropout-like attribute of ``module`` (its name contains
       ``drop``, or is ``p``) whose value is ``q`` (a float, or a dropout
       submodule's ``p``): Hugging Face's ``attention_dropout`` reached
       through ``dropout=self.attention_dropout`` under eager and SDPA
       attention alike; with several, the first defined;
    3. else the same among ``module.config``'s keys;

    ``None`` when no attribute holds ``q`` (a literal ``F.dropout(x, 0.2)``)."""
    if module is None:
        return None
    key = (frame.f_code if frame is not None else None, frame.f_lineno if frame is not None else None, q)
    try:
        cache = _NAME_CACHE.setdefault(module, {})
    except TypeError:  # not weakly referenceable: no cache
        cache = {}
    if key in cache:
        return cache[key]
    found = None
    config = getattr(module, "config", None)

    def value(attr):
        v = _q_of(module.__dict__.get(attr, module._modules.get(attr) if hasattr(module, "_modules") else None))
        if v is None and config is not None:
            v = _q_of(getattr(config, attr, None))
        return v

    if frame is not None:
        for attr in _REF.findall(_call_text(frame)):
            if _same(value(attr), q):
                found = attr
                break
    if found is None:
        own = list(module.__dict__.items()) + list(getattr(module, "_modules", {}).items())
        cands = [a for a, v in own if _DROPISH.search(a) and _same(_q_of(v), q)]
        if not cands and config is not None and hasattr(config, "__dict__"):
            cands = [a for a, v in vars(config).items() if _DROPISH.search(a) and _same(_q_of(v), q)]
        found = cands[0] if cands else None
    if len(cache) > 4096:
        cache.clear()
    cache[key] = found
    return found


def call_label(dims, attention_depth: int) -> str:
    """The kind of a dropout call, for a site whose ``q`` no attribute holds."""
    if attention_depth > 0:
        return "attention"
    return "dropout" if dims == "position" else ("feature_dropout" if dims == "feature" else f"dropout{dims}d")


def site_name(names: dict, frame, q: float, label: str) -> tuple:
    """``(name, module)`` of a functional site: ``"<caller>:<attribute>"``
    with the attribute that holds its ``q`` (``q_attribute``), else
    ``"<caller>:<label>@<q>"`` (e.g. ``"0:dropout@0.2"``), so that calls with
    different ``q`` never share a name and names do not depend on call order."""
    name, module = module_caller(names, frame)
    attr = q_attribute(module, _call_frame(frame), float(q))
    return f"{name or '<root>'}:{attr if attr else f'{label}@{float(q):g}'}", module


# --------------------------------------------------------------------------


def _bind_dropout(input, p=0.5, training=True, inplace=False):
    return input, p, training


def _bind_torch_dropout(input, p, train):
    return input, p, train


def _bind_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _bind_alpha(input, p=0.5, training=False, inplace=False):
    return input, p, training


def _bind_rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, *rest, **kw):
    return training


# func -> (binder, kind): kind "position" or the channel dims of dropoutNd
_DROPOUT = {
    F.dropout: (_bind_dropout, "position"),
    torch.dropout: (_bind_torch_dropout, "position"),
    torch.dropout_: (_bind_torch_dropout, "position"),
    F.dropout1d: (_bind_dropout, 1),
    F.dropout2d: (_bind_dropout, 2),
    F.dropout3d: (_bind_dropout, 3),
    torch.feature_dropout: (_bind_torch_dropout, "feature"),
    torch.feature_dropout_: (_bind_torch_dropout, "feature"),
}
_ALPHA = {F.alpha_dropout, F.feature_alpha_dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
          torch.alpha_dropout_, torch.feature_alpha_dropout_}
_RANDOM = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.normal, torch.poisson, torch.multinomial, torch.binomial,
    torch.native_dropout, torch.Tensor.bernoulli, torch.Tensor.bernoulli_, torch.Tensor.uniform_,
    torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.geometric_,
    torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.multinomial, F.gumbel_softmax,
}
_RRELU = {F.rrelu, F.rrelu_}


def _mha_body():
    """``F.multi_head_attention_forward`` with its ``has_torch_function``
    dispatch switched off, so that it can run *under* the mode (its inner
    dropout / attention calls then reach the mode) without recursing."""
    f = F.multi_head_attention_forward
    glb = dict(f.__globals__)
    glb["has_torch_function"] = lambda *a, **k: False
    g = types.FunctionType(f.__code__, glb, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


_MHA = _mha_body()


def sdpa_math(session, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """``softmax(q kᵀ · scale + bias) v`` with a site on the probabilities
    (torch's documented reference for ``scaled_dot_product_attention``)."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, -3)
        value = value.repeat_interleave(rep, -3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    masked = None
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(0)
        scores = scores.masked_fill(~keep, float("-inf"))
        masked = ~keep
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
            masked = ~attn_mask if masked is None else (masked | ~attn_mask)
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, -1)
    if masked is not None:  # a fully masked row attends to nothing (torch's math path gives 0 too)
        probs = torch.where(torch.isneginf(scores).all(-1, keepdim=True), 0.0, probs)
    if dropout_p > 0:
        probs = session.functional_site(probs, dropout_p, "position", "attention")
    return torch.matmul(probs, value)


def _channel_structure(h: torch.Tensor, dims, name: str) -> str:
    if dims == "feature":
        if h.dim() < 2:
            raise DropcheckError(f"torch.feature_dropout needs input (N, C, ...), got shape {tuple(h.shape)}")
        return "channel"
    batched = dims + 2
    if h.dim() == batched:
        return "channel"
    if h.dim() == batched - 1:
        return "channel-unbatched"
    raise DropcheckError(
        f"F.dropout{dims}d in module {name!r}: expected input of {batched - 1} or {batched} dims, got shape "
        f"{tuple(h.shape)}"
    )


class FunctionalMode(TorchFunctionMode):
    """The mode that makes functional and attention dropout into sites and
    refuses other randomness (module docstring)."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = self.session
        if s.bypass:
            return func(*args, **kwargs)
        entry = _DROPOUT.get(func)
        if entry is not None:
            binder, dims = entry
            h, p, training = binder(*args, **kwargs)
            if not training or float(p) == 0.0:
                return h
            name = s.caller()[0]
            structure = "position" if dims == "position" else _channel_structure(h, dims, name)
            return s.functional_site(h, p, structure, call_label(dims, s.attention_depth))
        if func is F.scaled_dot_product_attention:
            s.functional_seen = True
            return sdpa_math(s, *_bind_sdpa(*args, **kwargs))
        if func is F.multi_head_attention_forward:
            s.functional_seen = True
            s.attention_depth += 1
            try:
                with self:
                    return _MHA(*args, **kwargs)
            finally:
                s.attention_depth -= 1
        if func in _ALPHA:
            _, p, training = (_bind_alpha if func in (F.alpha_dropout, F.feature_alpha_dropout)
                              else _bind_torch_dropout)(*args, **kwargs)
            if not training or float(p) == 0.0:
                return func(*args, **kwargs)
            self._refuse(func, "alpha dropout's noise is not multiplicative")
        elif func in _RANDOM or (func in _RRELU and _bind_rrelu(*args, **kwargs)):
            self._refuse(func, "dropcheck cannot model noise that is not a dropout site")
        return func(*args, **kwargs)

    def _refuse(self, func, why: str) -> None:
        """Raise naming the module that made a random call; randomness
        outside the model's forward pass (no module of it on the stack) is
        not the model's and passes."""
        name, module = self.session.caller()
        if name is None:
            return
        what = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise DropcheckError(
            f"module {name!r} ({type(module).__name__}) draws random numbers in its forward pass ({what}); "
            f"{why}. Analytic passes run the model in training mode (so that every dropout call shows "
            "itself); remove or switch off this randomness, or make it a dropout site"
        )


# --------------------------------------------------------------------------
# per-site drop probabilities of functional sites in the model's own passes


def _replace(args, kwargs, index: int, key: str, value):
    if key in kwargs or len(args) <= index:
        kwargs = dict(kwargs)
        kwargs[key] = value
        return args, kwargs
    args = list(args)
    args[index] = value
    return tuple(args), kwargs


class OverrideMode(TorchFunctionMode):
    """Applies a model's per-site drop probabilities (``model._dropcheck_q``,
    set by ``with_drop_probability``) to its functional and attention dropout
    calls in its own forward passes (train mode, outside dropcheck's analytic
    passes): each call's ``p`` / ``dropout_p`` is replaced by the site's new
    ``q``; sites are named as in the analytic passes (``site_name``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = {id(m): (n or "<root>") for n, m in model.named_modules()}
        self.attention_depth = 0

    def _new_q(self, q: float, label: str) -> float:
        name, _ = site_name(self.names, sys._getframe(2), float(q), label)
        return functional_override(self.model, name, float(q))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _DROPOUT.get(func)
        if entry is not None:
            binder, dims = entry
            _, p, training = binder(*args, **kwargs)
            if training and float(p) > 0.0:
                q = self._new_q(p, call_label(dims, self.attention_depth))
                args, kwargs = _replace(args, kwargs, 1, "p", q)
        elif func is F.scaled_dot_product_attention:
            p = _bind_sdpa(*args, **kwargs)[4]
            if float(p) > 0.0:
                args, kwargs = _replace(args, kwargs, 4, "dropout_p", self._new_q(p, "attention"))
        elif func is F.multi_head_attention_forward:
            self.attention_depth += 1
            try:
                with self:
                    return _MHA(*args, **kwargs)
            finally:
                self.attention_depth -= 1
        return func(*args, **kwargs)


def override_pre_hook(module, args):
    """Forward pre-hook of a ``with_drop_probability`` copy: enter
    ``OverrideMode`` for the pass (not inside a dropcheck analytic pass of a
    model containing it, which applies the same table itself)."""
    if session_covering(module) is not None or not module.__dict__.get("_dropcheck_q"):
        return None
    mode = OverrideMode(module)
    mode.__enter__()
    module.__dict__.setdefault("_dropcheck_modes", []).append(mode)
    return None


def override_post_hook(module, args, output):
    """Forward hook (``always_call``): leave the pass's ``OverrideMode``."""
    modes = module.__dict__.get("_dropcheck_modes")
    if modes:
        modes.pop().__exit__(None, None, None)
    return None
