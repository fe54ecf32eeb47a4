"""Functional dropout sites are first-class on Hugging Face models whose
dropout is all functional (tiny OPT, BART, Llama built from configs, no
weights): unique names that do not depend on the attention implementation
or on call order, and per-site drop probabilities that reach every site,
in dropcheck's passes and in the model's own."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import dropcheck as dc
import dropcheck.testing as dct
import model_zoo as Z

if not os.environ.get("CI"):
    pytest.importorskip("transformers")


def _names(zoo):
    return [(s.name, s.q) for s in dc.find_sites(zoo.model, zoo.inputs)]


@pytest.mark.parametrize("kind", list(Z.FUNCTIONAL_HF))
def test_site_names_are_unique_and_the_same_under_eager_and_sdpa(kind):
    eager, sdpa = _names(Z.FUNCTIONAL_HF[kind](attn="eager")), _names(Z.FUNCTIONAL_HF[kind](attn="sdpa"))
    assert eager == sdpa
    names = [n for n, _ in sdpa]
    assert len(set(names)) == len(names), names
    assert all(":" in n and "@" not in n for n in names), names  # every q found in an attribute


def test_bart_names_come_from_the_attribute_holding_q_in_encoder_and_decoder():
    names = dict(_names(Z.bart()))
    for stack in ("encoder", "decoder"):
        assert names[f"model.{stack}.layers.0:dropout"] == 0.3
        assert names[f"model.{stack}.layers.0:activation_dropout"] == 0.1
        assert names[f"model.{stack}.layers.0.self_attn:dropout"] == 0.2
    assert names["model.decoder.layers.0.encoder_attn:dropout"] == 0.2
    # equal values: the call's source (p=self.activation_dropout) still tells them apart
    tied = dict(_names(Z.bart(dropout=0.1, activation_dropout=0.1)))
    assert {"model.encoder.layers.0:dropout", "model.encoder.layers.0:activation_dropout"} <= set(tied)


@pytest.mark.parametrize("kind", list(Z.FUNCTIONAL_HF))
def test_with_drop_probability_reaches_every_site_in_dropchecks_and_the_models_own_passes(kind):
    zoo = Z.FUNCTIONAL_HF[kind]()
    m, x, y = zoo.model, zoo.inputs, zoo.targets
    low, high = (dc.with_drop_probability(m, q, inputs=x) for q in (0.02, 0.4))
    assert {q for _, q in _names(Z.Zoo("", low, x, y))} == {0.02}
    assert {q for _, q in _names(Z.Zoo("", high, x, y))} == {0.4}
    assert {q for _, q in _names(zoo)} != {0.4}  # the original is untouched
    # the model's own train-mode passes use the new q: at q = 0 every train-mode pass is the eval pass
    off = dc.with_drop_probability(m, 0.0, inputs=x)
    assert dc.find_sites(off, x, require=False) == []
    assert tuple(dct.own_dropout_gap(off, x, y, 5, generator=0)) == (0.0, 0.0)
    assert dct.own_dropout_gap(high, x, y, 5, generator=0).stderr > 0
    # one site by name
    first = _names(zoo)[0][0]
    one = dc.with_drop_probability(m, {first: 0.05}, inputs=x)
    got = dict(_names(Z.Zoo("", one, x, y)))
    assert got[first] == 0.05 and {k: v for k, v in got.items() if k != first} == {
        k: v for k, v in _names(zoo) if k != first}


def test_the_overridden_copy_agrees_with_its_own_dropout():
    zoo = Z.llama(attention_dropout=0.1)
    m = dc.with_drop_probability(zoo.model, 0.4, inputs=zoo.inputs)
    dct.assert_gap_matches_own_dropout(m, zoo.inputs, zoo.targets, 300, generator=5)


def test_sites_that_cannot_be_overridden_are_refused_by_name():
    zoo = Z.opt()
    with pytest.raises(dc.DropcheckError, match="no_such_site"):
        dc.with_drop_probability(zoo.model, {"no_such_site": 0.1}, inputs=zoo.inputs)
    with pytest.raises(dc.DropcheckError, match="pass inputs="):
        dc.with_drop_probability(zoo.model, {"model.decoder.layers.0:dropout": 0.1})

    class Stuck(nn.Dropout):  # a dropout module whose q ignores assignment
        @property
        def p(self):
            return 0.3

        @p.setter
        def p(self, value):
            pass

    net = nn.Sequential(nn.Linear(3, 3), Stuck(), nn.Linear(3, 2))
    with pytest.raises(dc.DropcheckError, match=r"\['1'\].*cannot be set"):
        dc.with_drop_probability(net, 0.1)


def test_taylor_map_r_drop_moves_with_q_on_opt():
    from dropcheck._taylor_map import map_model

    zoo = Z.opt()
    rows = map_model("opt", zoo.model, zoo.inputs, zoo.targets, [0.01, 0.3], samples=200, noises=("bernoulli",),
                     limit=False)
    lo, hi = rows
    assert abs(hi.R_drop - lo.R_drop) > 4 * (hi.R_drop_stderr ** 2 + lo.R_drop_stderr ** 2) ** 0.5, rows
    # R_approx does not depend on q, so λ R_approx scales with λ(q) exactly
    assert hi.R_approx_weighted / lo.R_approx_weighted == pytest.approx(dc.dropout_lambda(0.3) / dc.dropout_lambda(0.01))


# -- precision: a float32 RMSNorm inside a float64 Llama ---------------------------


def test_compute_dtype_sees_the_float32_norm_and_only_it():
    from dropcheck._precision import compute_dtype

    assert compute_dtype(Z.llama().model, Z.llama().inputs) == torch.float32  # RMSNorm upcasts to float32
    zoo = Z.opt()  # float32 masks made from integers are not a downcast of the data
    assert compute_dtype(zoo.model, zoo.inputs) == torch.float64


def test_implicit_noise_fd_step_follows_the_models_precision():
    zoo = Z.llama()
    m, x, y = zoo.model, zoo.inputs, zoo.targets

    def err(eps):
        a = dc.implicit_noise(m, x, y, generator=3)
        b = dc.implicit_noise(m, x, y, generator=3, estimator="fd", eps=eps)
        fa = torch.cat([v.reshape(-1) for v in a.values()])
        fb = torch.cat([v.reshape(-1) for v in b.values()])
        return float((fa - fb).norm() / fa.norm())

    from dropcheck._common import default_eps, fd_step_and_tolerance

    default, float64_step = err(None), err(default_eps(torch.float64))
    assert default < fd_step_and_tolerance(torch.float32)[1]
    assert float64_step > 10 * default  # float64's step drowns in the float32 norm's rounding


def test_verify_model_passes_on_llama_and_notes_the_float32_limit():
    from dropcheck._cases import Case
    from dropcheck._verify import run_case

    zoo = Z.llama()
    rows = run_case(Case("llama", "tiny Llama", zoo.model, zoo.inputs, zoo.targets), draws=100, seed=0)
    assert not [r for r in rows if r.status == "FAIL"], [(r.quantity, r.error, r.tolerance, r.note) for r in rows]
    fd_rows = [r for r in rows if "fd" in r.route_a or "fd" in r.route_b]
    assert fd_rows and all("float32" in r.note for r in fd_rows)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["opt", "bart"])
def test_verify_model_passes_on_opt_and_bart(kind):
    """``verify --model`` on the all-functional OPT and BART (float64 throughout:
    no precision note): every check passes or is skipped for size."""
    from dropcheck._cases import Case
    from dropcheck._verify import run_case

    zoo = Z.FUNCTIONAL_HF[kind]()
    rows = run_case(Case(kind, kind, zoo.model, zoo.inputs, zoo.targets), draws=100, seed=0)
    assert not [r for r in rows if r.status == "FAIL"], [(r.quantity, r.error, r.tolerance, r.note) for r in rows]


def test_a_module_q_that_feeds_a_functional_site_is_not_refused():
    """GPT-2 under SDPA passes ``attn_dropout.p`` to the attention call: setting
    the module sets the functional site too, and that is no refusal."""
    zoo = Z.gpt2()
    m = dc.with_drop_probability(zoo.model, {"transformer.h.0.attn.attn_dropout": 0.05}, inputs=zoo.inputs)
    got = dict(_names(Z.Zoo("", m, zoo.inputs, zoo.targets)))
    assert got["transformer.h.0.attn:attn_dropout"] == 0.05 and got["transformer.drop"] == 0.3


def test_a_copy_wrapped_in_another_module_keeps_its_names_and_its_q():
    zoo = Z.llama(attention_dropout=0.1)
    one = dc.with_drop_probability(zoo.model, {"model.layers.1.self_attn:attention_dropout": 0.4}, inputs=zoo.inputs)

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    w = Wrapper(one)
    assert _names(Z.Zoo("", w, zoo.inputs, zoo.targets)) == [
        ("m.model.layers.0.self_attn:attention_dropout", 0.1), ("m.model.layers.1.self_attn:attention_dropout", 0.4)]
    dct.assert_gap_matches_own_dropout(w, zoo.inputs, zoo.targets, 300, generator=7, min_resolution=0)


def test_the_name_cache_dies_with_its_module():
    """Site names are cached per module object, never per ``id()``: a module
    freed and another made at the same address must not inherit its names (an
    id-keyed cache named a copied Llama's sites ``:dropout`` in one test order)."""
    import gc

    from dropcheck import _functional as fn

    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = 0.1

    a = A()
    assert fn.q_attribute(a, None, 0.1) == "dropout"
    assert a in fn._NAME_CACHE
    n = len(fn._NAME_CACHE)
    del a
    gc.collect()
    assert len(fn._NAME_CACHE) == n - 1
