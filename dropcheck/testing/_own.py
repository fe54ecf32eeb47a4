"""The ground truth: the model's own dropout, by plain Monte Carlo."""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .._common import IGNORE_INDEX, _invoke, extract_logits
from .._errors import DropcheckError
from .._gap import GapEstimate


def _keeps_eval(m: nn.Module) -> bool:
    # normalisation with running statistics: the deterministic network uses them
    return isinstance(m, nn.modules.batchnorm._NormBase)


def own_loss(model: nn.Module, inputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``-100``,
    from the model's own forward pass in whatever mode it is in (the logits
    as dropcheck reads them: a tensor, ``ModelOutput.logits``, a dict's
    ``"logits"`` or a tuple's first element)."""
    logits = extract_logits(_invoke(model, inputs))
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise DropcheckError(
            f"logits of shape {tuple(logits.shape)} do not match targets of shape {tuple(targets.shape)}"
        )
    y = targets.reshape(-1)
    if bool((y == IGNORE_INDEX).all()):
        raise DropcheckError(f"every target is ignore_index={IGNORE_INDEX}: no position to average over")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y, ignore_index=IGNORE_INDEX)


def own_dropout_gap(
    model: nn.Module,
    inputs,
    targets: torch.Tensor,
    samples: int = 400,
    *,
    generator: Union[torch.Generator, int, None] = 0,
) -> GapEstimate:
    """The model's *own* dropout gap ``E[L(train-mode pass)] − L(eval-mode pass)``
    by plain Monte Carlo, with its standard error (a ``GapEstimate``).

    This is the ground truth dropcheck's ``dropout_gap`` (4.1) is compared
    with: no dropcheck machinery is involved, only the model's own forward
    pass.  ``L`` is the mean cross-entropy over positions whose target is not
    ``-100``.  In the train-mode passes BatchNorm (any normalisation with
    running statistics) stays in eval mode, as in dropcheck's analytic passes:
    its running statistics define the network.  The model's random draws come
    from torch's global generator, seeded from ``generator`` (a
    ``torch.Generator`` or an int seed) inside ``torch.random.fork_rng``, so
    the caller's global RNG state is left as it was and a seed replays the
    draws.  Training flags are restored on exit.
    """
    samples = int(samples)
    if samples < 2:
        raise DropcheckError(f"own_dropout_gap needs samples >= 2, got {samples}")
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    elif generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    else:
        seed = int(generator)
    flags = [(m, m.training) for m in model.modules()]
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            base = own_loss(model, inputs, targets)
            model.train()
            for m in model.modules():
                if _keeps_eval(m):
                    m.eval()
            torch.manual_seed(seed)
            vals = torch.stack([own_loss(model, inputs, targets) for _ in range(samples)]) - base
    finally:
        for m, flag in flags:
            m.training = flag
    return GapEstimate(float(vals.mean()), float(vals.std(unbiased=True)) / math.sqrt(samples), samples)
