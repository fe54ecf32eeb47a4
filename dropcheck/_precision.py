"""The precision a model computes in (one clean analytic pass).

Above ``_analytic`` in the package's layers: the pass runs in
``analytic_mode`` (the clean network, no random draw).  The central
differences of ``_explicit`` and ``_implicit`` and ``dropcheck verify`` take
their step and tolerance from it (``_common.fd_step_and_tolerance``).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._analytic import analytic_mode
from ._common import call_model
from ._session import current_session

# model -> ((module ids, param dtype), compute dtype)
_PRECISION: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def compute_dtype(model: nn.Module, inputs) -> torch.dtype:
    """The least precise floating dtype the model actually computes in: one
    clean analytic forward pass (no grad, no random draw) records the dtype of
    every floating result computed from more precise floating inputs; a
    float32 RMSNorm inside a float64 model gives float32 (float32 masks or
    position tables made from integers do not count).  Cached per model (and
    its parameters' dtype)."""
    pdt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    fp = (tuple(id(m) for m in model.modules()), pdt)
    hit = _PRECISION.get(model)
    if hit is not None and hit[0] == fp:
        return hit[1]
    seen: set = set()

    def floats(x, acc):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                acc.append(x.dtype)
        elif isinstance(x, (tuple, list)):
            for v in x:
                floats(v, acc)
        return acc

    class _Watch(TorchFunctionMode):
        """Records the dtype of results computed from more precise floating
        inputs (a downcast on the data path, e.g. ``h.to(torch.float32)``);
        tensors made from integers or constants (masks, positions) do not count."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = floats(args, floats(list((kwargs or {}).values()), []))
            if ins:
                finest = min(torch.finfo(d).eps for d in ins)
                for d in floats(out, []):
                    if torch.finfo(d).eps > finest:
                        seen.add(d)
            return out

    if current_session(model) is not None:  # inside another pass of this model: no pass of our own
        return hit[1] if hit is not None else pdt
    with torch.no_grad(), analytic_mode(model), _Watch():  # the clean network, no random draw
        call_model(model, inputs)
    seen.add(pdt)
    low = max(seen, key=lambda d: torch.finfo(d).eps)
    _PRECISION[model] = (fp, low)
    return low
