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
model on the Python stack), e.g. ``"transformer.h.0.attn:attention"``.
Calls with ``training=False`` or ``p = 0`` are the identity.

Everything else random is refused with an error naming the module:
``torch.rand*``, ``bernoulli``, ``Tensor.uniform_``, alpha dropout, RReLU in
training, ... (noise dropcheck cannot describe as multiplicative
mean-one noise would otherwise be silently left in).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._errors import DropcheckError


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
            label = "attention" if s.attention_depth > 0 else (
                "dropout" if dims == "position" else ("feature_dropout" if dims == "feature" else f"dropout{dims}d"))
            return s.functional_site(h, p, structure, label)
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
