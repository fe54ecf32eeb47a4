"""dropcheck on models built the way libraries build them (model_zoo.py).

Ground truth for every model is its *own* dropout: ``E[loss in train mode] -
loss in eval mode`` by plain Monte Carlo with the model's own random draws
(torch's global RNG), float64.  dropcheck's ``R_drop`` (its own noise, drawn
at the sites it found) must agree within Monte Carlo error; a site dropcheck
missed (attention dropout, stochastic depth) or invented would show as a
difference.  The explicit-regularizer estimators must agree with each other,
and every analytic result must be the same whether the caller left the model
in train or in eval mode.
"""

from __future__ import annotations

import os

import pytest
import torch

import dropcheck as dc
import dropcheck.testing as dct
import model_zoo as Z
from dc_stats import Z_MAX

MODELS = list(Z.BUILDERS)
# the attention dropout site of each model: the attention module, then the attribute holding q (a float, or
# GPT-2's attn_dropout module whose p reaches scaled_dot_product_attention)
ATTENTION = {"gpt2": "transformer.h.0.attn:attn_dropout", "bert": "bert.encoder.layer.0.attention.self:dropout",
             "t5": "encoder.block.0.layer.0.SelfAttention:dropout", "encoder_layer": "enc.self_attn:dropout"}
DRAWS = 600


def build(name: str, make):
    """The Hugging Face models need ``transformers`` (the ``test`` extra); CI
    installs it, so there a missing package fails instead of skipping.  The
    real timm / torchvision classes are skipped where those are absent."""
    if name in Z.HF and not os.environ.get("CI"):
        pytest.importorskip("transformers")
    for package in Z.OPTIONAL.get(name, ()):
        pytest.importorskip(package)
    return make()


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _flat(g: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in g.values()])


@pytest.fixture(scope="module", params=MODELS)
def zoo(request):
    return build(request.param, Z.BUILDERS[request.param])


def test_gap_matches_the_models_own_dropout(zoo):
    # own gap from seed 1 (BatchNorm kept in eval mode), dropcheck's from seed 2; the own gap must be
    # resolved (> 4 standard errors), else agreement says nothing
    print(zoo.name, dct.assert_gap_matches_own_dropout(zoo.model, zoo.inputs, zoo.targets, DRAWS, generator=1))


def test_sites_fire_and_are_named_by_module(zoo):
    sites = dc.find_sites(zoo.model, zoo.inputs)
    names = [s.name for s in sites]
    assert len(set(names)) == len(names)
    modules = dict(zoo.model.named_modules())
    for s in sites:
        assert s.name.split(":")[0] in modules or s.name == "<root>"
    if zoo.name in ATTENTION:  # attention dropout: a functional site named by the attribute that holds its q
        assert ATTENTION[zoo.name] in names and {s.functional for s in sites if s.name == ATTENTION[zoo.name]} == {True}
    if zoo.name == "gpt2":  # SDPA path: the attn_dropout module never fires, its p reaches SDPA
        assert "transformer.h.0.attn.attn_dropout" not in names
    if zoo.name.startswith("residual_sd"):
        assert {s.name: s.structure for s in sites} == {
            "drops.0": "example", "drops.1": "example", "drops.2": "batch", "drop": "position"}


def test_estimators_agree_and_do_not_depend_on_the_mode(zoo):
    m, X, y = zoo.model, zoo.inputs, zoo.targets
    buffers = {k: v.clone() for k, v in m.state_dict().items()}
    results = {}
    for mode in ("eval", "train"):
        m.train(mode == "train")
        flags = [mm.training for mm in m.modules()]
        r = {
            "exact": _f(dc.explicit_regularizer(m, X, y)),
            "fd": sum(_f(v) for v in dc.explicit_regularizer(
                m, X, y, estimator="fd", generator=3, eps=zoo.fd_eps, per_site=True).values()),
            "hutchinson1": _f(dc.explicit_regularizer(m, X, y, estimator="hutchinson", generator=3)),
            "taylor": _f(dc.taylor_regularizer(m, X, y)),
            "xi": _flat(dc.implicit_noise(m, X, y, generator=4)),
            "xi_fd": _flat(dc.implicit_noise(m, X, y, generator=4, estimator="fd", eps=zoo.fd_eps)),
            "objective": _f(dc.analytic_dropout_objective(m, X, y, generator=5).objective),
        }
        assert [mm.training for mm in m.modules()] == flags, "training flags not restored"
        for k, v in m.state_dict().items():
            assert torch.equal(v, buffers[k]), f"{k} changed"
        results[mode] = r
        # same probe: the finite difference of two forward passes against the JVP
        assert abs(r["fd"] - r["hutchinson1"]) <= zoo.fd_rtol * abs(r["hutchinson1"])
        err = float((r["xi"] - r["xi_fd"]).norm() / r["xi"].norm())
        assert err < zoo.fd_rtol, err
    for k in results["eval"]:
        a, b = results["eval"][k], results["train"][k]
        if isinstance(a, torch.Tensor):
            assert torch.allclose(a, b, rtol=1e-12, atol=0), k
        else:
            assert a == pytest.approx(b, rel=1e-12, abs=0), k

    # unbiased estimators against the exact value (train mode: the harder case)
    m.train()
    exact = results["train"]["exact"]
    gen = torch.Generator().manual_seed(6)
    for est in ("hutchinson", "sampled"):
        mean, se = dct.mean_stderr([_f(dc.explicit_regularizer(m, X, y, estimator=est, generator=gen)) for _ in range(40)])
        assert abs(mean - exact) < Z_MAX * se, (est, mean, se, exact)
    mean, se = dct.mean_stderr([_f(dc.taylor_regularizer(m, X, y, estimator="hutchinson", generator=gen))
                         for _ in range(30)])
    assert abs(mean - results["train"]["taylor"]) < Z_MAX * se


@pytest.mark.parametrize("name", list(Z.ATTN_ONLY))
def test_attention_dropout_alone_matches_the_models_own(name):
    """All of the model's dropout is attention dropout (SDPA's ``dropout_p``;
    ``nn.MultiheadAttention`` with and without ``need_weights``): had
    dropcheck missed it, it would find no site; had it put the noise in the
    wrong place (scores instead of probabilities), the gaps would differ."""
    zoo = build(name, Z.ATTN_ONLY[name])
    sites = dc.find_sites(zoo.model, zoo.inputs)
    assert sites and all(s.functional for s in sites), [s.name for s in sites]
    print(name, dct.assert_gap_matches_own_dropout(zoo.model, zoo.inputs, zoo.targets, DRAWS, generator=1))


@pytest.mark.heavy
@pytest.mark.parametrize("name", MODELS + list(Z.ATTN_ONLY))
def test_gap_matches_the_models_own_dropout_heavy(name):
    """The ground-truth comparison with 8x the draws (standard errors ~2.8x
    smaller): ``HYPOTHESIS_PROFILE=heavy python -m pytest -m heavy``."""
    zoo = build(name, {**Z.BUILDERS, **Z.ATTN_ONLY}[name])
    print(name, dct.assert_gap_matches_own_dropout(zoo.model, zoo.inputs, zoo.targets, 8 * DRAWS, generator=11,
                                                   min_resolution=0))


def test_the_zoo_copies_of_drop_path_and_stochastic_depth_are_the_real_classes():
    """model_zoo's DropPath / StochasticDepth stand in for timm's and
    torchvision's on CI: with the same weights and the same global seed, the
    model built from the real classes gives the same training-mode output,
    draw for draw, and dropcheck finds the same sites with the same value."""
    real = build("residual_sd_real", Z.BUILDERS["residual_sd_real"])
    copy = Z.residual_sd()
    real.model.load_state_dict(copy.model.state_dict())
    for zoo in (real, copy):
        zoo.model.train()
    for seed in range(5):
        outs = []
        for zoo in (real, copy):
            torch.manual_seed(seed)
            outs.append(zoo.model(copy.inputs))
        assert torch.equal(outs[0], outs[1]), seed
    sites = [{s.name: s.structure for s in dc.find_sites(z.model, copy.inputs)} for z in (real, copy)]
    assert sites[0] == sites[1]
    vals = [_f(dc.explicit_regularizer(z.model, copy.inputs, copy.targets)) for z in (real, copy)]
    assert vals[0] == pytest.approx(vals[1], rel=1e-12)
    assert dc.with_drop_probability(real.model, 0.1).drops[0].drop_prob == 0.1
