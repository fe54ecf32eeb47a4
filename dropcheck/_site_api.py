"""The public site functions that may run a forward pass.

``find_sites(model, inputs)`` runs one analytic pass (``_analytic.py``) to
list the sites that fire, functional ones included; ``with_drop_probability``
re-sets the sites' drop probabilities (module attributes, and a per-site
table that ``_functional.OverrideMode`` and the analytic passes apply) and,
given inputs, checks them in a forward pass.  They sit above ``_analytic`` in
the package's layers; ``_sites.py`` below it holds the site modules and the
static list of them (``module_sites``) that analytic mode hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

from ._analytic import fired_sites
from ._errors import DropcheckError, NoDropoutSiteError
from ._functional import override_post_hook, override_pre_hook
from ._sites import _SUPPORTED_TEXT, SiteSpec, _check_q, _q_attribute, module_sites


def find_sites(model: nn.Module, inputs=None, *, require: bool = True) -> list[SiteSpec]:
    """The dropout sites of ``model`` with ``q > 0``.

    Without ``inputs``: the dropout *modules*, in module order (a static
    list: it cannot see functional dropout calls, and it lists modules that
    a given forward pass may never call, such as Hugging Face's
    ``attn_dropout`` when attention runs through
    ``scaled_dot_product_attention``).  With ``inputs`` (what ``model``
    takes; a dict is passed as keywords): one analytic forward pass is run
    and the sites that actually fired are returned in call order, functional
    ones included (one entry per site, however often it was called).

    Raises ``NoDropoutSiteError`` when there are none (and ``require``), and
    a ``DropcheckError`` naming the module for dropout whose noise is not
    multiplicative (``AlphaDropout``) or that runs where dropcheck cannot
    see it (``nn.LSTM/GRU/RNN`` with ``dropout > 0`` between stacked
    layers): silently skipping one would give a wrong regularizer.
    """
    if inputs is None:
        return module_sites(model, require=require)
    sites = fired_sites(model, inputs)
    if require and not sites:
        raise NoDropoutSiteError(
            f"{type(model).__name__} has no dropout site with q > 0 in a forward pass; " + _SUPPORTED_TEXT
        )
    return sites


def with_drop_probability(model: nn.Module, q, *, inputs=None) -> nn.Module:
    """A deep copy of ``model`` whose dropout sites have new drop probabilities;
    ``model`` itself is untouched.

    ``q``: a number (every site with ``q > 0``, module and functional alike;
    sites at ``q = 0`` stay off) or a mapping ``{site name: q}`` (the named
    sites; the others keep theirs).  Module sites (``nn.Dropout``, ...) get
    the new value in their attribute (``p``, timm's ``drop_prob``).
    Functional and attention dropout sites (``F.dropout``,
    ``scaled_dot_product_attention(dropout_p=...)``, whose ``q`` lives in the
    caller's code) get it through a torch-function mode: the copy carries a
    table of per-site ``q`` that dropcheck's analytic passes apply, and a
    forward pre-hook applies it to the copy's own forward passes (train-mode
    training or ``dropcheck.testing.own_dropout_gap``) as well.

    ``inputs`` (what the model takes): run one forward pass of the copy and
    check that every site now has its requested ``q``; a site whose ``q``
    did not change is refused with its name (``DropcheckError``), never
    silently kept.  A mapping that names sites other than the model's
    dropout modules needs ``inputs`` (functional sites are found in a
    forward pass).  Used to trace a quantity against ``q``
    (``dropcheck taylor-map``, ``dropcheck.taylor_regime``)."""
    if isinstance(q, Mapping):
        table = {str(k): _check_q(v, f"with_drop_probability[{k!r}]") for k, v in q.items()}
    else:
        table = {"*": _check_q(q, "with_drop_probability")}
    copy_ = copy.deepcopy(model)
    modules = find_sites(copy_, require=False)
    module_names = {s.name for s in modules}
    refused = []
    for s in modules:
        if "*" in table or s.name in table:
            want, attr = table.get(s.name, table.get("*")), _q_attribute(s.module)
            try:
                setattr(s.module, attr, want)
            except (AttributeError, TypeError):
                pass
            if getattr(s.module, attr, None) != want:
                refused.append(s.name)
    if refused:
        raise DropcheckError(
            f"with_drop_probability: the drop probability of module site(s) {refused} cannot be set (their "
            f"attribute keeps its value); dropcheck refuses rather than keep their q silently"
        )
    functional = {k: v for k, v in table.items() if k not in module_names}
    old = dict(copy_.__dict__.get("_dropcheck_q") or {})
    if "*" in functional:
        old = {}  # a new q for every site replaces earlier per-site ones
    old.update(functional)
    if old:
        if "_dropcheck_q" not in copy_.__dict__:
            copy_.register_forward_pre_hook(override_pre_hook)
            copy_.register_forward_hook(override_post_hook, always_call=True)
        copy_.__dict__["_dropcheck_q"] = old
    unknown = sorted(k for k in functional if k != "*")
    if inputs is None:
        if unknown:
            raise DropcheckError(
                f"with_drop_probability: {unknown} name no dropout module of {type(model).__name__} "
                f"(its modules: {sorted(module_names)}); pass inputs= so that functional sites are found in a "
                "forward pass"
            )
        return copy_
    before = {s.name: s.q for s in find_sites(model, inputs, require=False)}
    after = {s.name: s.q for s in find_sites(copy_, inputs, require=False)}
    missing = sorted(set(unknown) - set(before))
    if missing:
        raise DropcheckError(
            f"with_drop_probability: {missing} name no site of {type(model).__name__}; its sites are "
            f"{sorted(before)}"
        )
    # the sites asked for (another site may change with them: GPT-2's SDPA call reads attn_dropout.p)
    want = {n: table.get(n, table["*"]) if "*" in table else table[n] for n in before if n in table or "*" in table}
    kept = sorted(n for n, q1 in want.items() if q1 > 0 and (n not in after or abs(after[n] - q1) > 1e-12))
    if kept:
        raise DropcheckError(
            f"with_drop_probability: site(s) {kept} of {type(model).__name__} could not be set to the requested "
            f"q (found {[after.get(n) for n in kept]}); dropcheck refuses rather than keep their q silently"
        )
    return copy_
