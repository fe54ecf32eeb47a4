"""The public testing kit (``dropcheck.testing``): its ground truth, its
assertions (they pass on true properties and fail, with the z-score, on
false ones), its strategies and its pytest plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import example, given
from torch import nn

import dropcheck as dc
import dropcheck.testing as dct
from dropcheck.testing import strategies as dst
from dropcheck.testing.pytest_plugin import plugin_args

import model_zoo as Z

# one site of every kind; seed and scale chosen so that its gap is resolved (own gap -16 standard errors at
# 300 draws; most seeds at scale 2 give |gap| > 7 se)
ALL_KINDS = dict(blocks=[(k, 0.3) for k in dct.SITE_KINDS], d=3, classes=3, n=2, t=3, scale=2.0, ignore=0.25,
                 seed=1)


@given(dst.networks(max_blocks=2))
@example(dct.build_case(ALL_KINDS))
@dct.hypothesis_settings(max_examples=4)
def test_dropcheck_gap_matches_the_models_own_dropout_on_every_site_kind(case):
    # min_resolution=0: a drawn network's gap may be within noise of 0; the all-kinds @example is resolved
    dct.assert_gap_matches_own_dropout(case.model, case.inputs, case.targets, 300, min_resolution=0)


def test_the_all_kinds_network_has_one_site_of_each_kind_and_a_resolved_gap():
    case = dct.build_case(ALL_KINDS)
    sites = dc.find_sites(case.model, case.inputs)
    assert len(sites) == len(dct.SITE_KINDS)
    assert sorted({s.structure for s in sites}) == ["channel", "example", "locked", "position", "weight"]
    own = dct.own_dropout_gap(case.model, case.inputs, case.targets, 300, generator=0)
    assert abs(own.value) > 4 * own.stderr


def test_a_missed_site_fails_with_the_z_score_and_the_inputs():
    case = dct.build_case(ALL_KINDS)
    first = dc.find_sites(case.model, case.inputs)[0].name
    with pytest.raises(AssertionError, match=r"z = .*SmallNet, inputs tensor\(2, 3, 3\):float64"):
        dct.assert_gap_matches_own_dropout(case.model, case.inputs, case.targets, 300, sites=[first])


def test_own_dropout_gap_replays_its_seed_and_leaves_the_global_rng_and_modes_alone():
    case = dct.build_case(ALL_KINDS)
    case.model.eval()
    state = torch.random.get_rng_state()
    a = dct.own_dropout_gap(case.model, case.inputs, case.targets, 20, generator=7)
    b = dct.own_dropout_gap(case.model, case.inputs, case.targets, 20, generator=torch.Generator().manual_seed(3))
    c = dct.own_dropout_gap(case.model, case.inputs, case.targets, 20, generator=7)
    assert a == c and a != b and a.samples == 20
    assert torch.equal(state, torch.random.get_rng_state())
    assert not any(m.training for m in case.model.modules())


def test_own_dropout_gap_keeps_batchnorm_in_eval_and_ignores_minus_100():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 1, 0])
    own = dct.own_dropout_gap(model, x, y, 400, generator=1)
    assert model[1].running_mean.eq(0.5).all()  # eval mode: running statistics neither used from the batch nor updated
    ours = dc.dropout_gap(model, x, y, samples=400, generator=2)
    assert abs(dct.two_sample_z(own.value, own.stderr, ours.value, ours.stderr)) < dct.Z_MAX
    with pytest.raises(dc.DropcheckError, match="every target"):
        dct.own_dropout_gap(model, x, torch.full((5,), -100), 4)


def test_assert_unbiased_accepts_an_unbiased_estimator_and_rejects_a_biased_one():
    case = dct.build_case(dict(ALL_KINDS, blocks=[("dropout", 0.3), ("locked", 0.2)]))
    m, x, y = case.model, case.inputs, case.targets
    exact = dc.explicit_regularizer(m, x, y)
    dct.assert_unbiased(lambda g: dc.explicit_regularizer(m, x, y, estimator="hutchinson", generator=g), exact, 200)
    with pytest.raises(AssertionError, match="z = "):
        dct.assert_unbiased(lambda g: 1.2 * dc.explicit_regularizer(m, x, y, estimator="hutchinson", generator=g),
                            exact, 200)


def test_assert_second_order_holds_on_a_last_layer_site_and_fails_on_a_narrow_deep_one():
    # dropout only on the input of the last linear layer: R_taylor = λ R_approx exactly and R_drop agrees with
    # it to second order; a width-2 tanh layer with large weights is far from the second-order picture
    wide, x, y = Z.wide_last_layer_net()
    dct.assert_second_order_holds(wide, x, y, rtol=0.25, samples=2000)
    narrow = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.05), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        for p in narrow.parameters():
            p.mul_(6.0)
    with pytest.raises(AssertionError, match="second-order picture fails"):
        dct.assert_second_order_holds(narrow, x, y, rtol=0.25, samples=2000)


@given(dst.targets((3, 4), 5), dst.drop_probabilities(), dst.generators())
def test_strategies_draw_bounded_replayable_values(y, q, gen):
    assert ((y >= 0) & (y < 5) | (y == -100)).all() and (y != -100).any()
    assert 0.0 < q < 1.0
    assert repr(gen).startswith("SeededGenerator(")
    again = dst.SeededGenerator(gen.seed_value)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=again))


@pytest.mark.slow
def test_the_pytest_plugin_skips_heavy_tests_unless_asked(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import os, pytest

        @pytest.mark.heavy
        def test_long():
            assert os.environ.get("DROPCHECK_HEAVY") == "1"

        def test_short(dropcheck_seed):
            assert dropcheck_seed == 0
    """))
    env = {k: v for k, v in os.environ.items() if k != "DROPCHECK_HEAVY"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(dct.__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's dropcheck

    def run(*args):
        cmd = [sys.executable, "-m", "pytest", *plugin_args(), "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", "-p", "no:randomly", str(tmp_path), "-rs", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)

    light = run()
    assert "1 passed, 1 skipped" in light.stdout, light.stdout + light.stderr
    assert "run with --heavy" in light.stdout
    heavy = run("--heavy")
    assert "2 passed" in heavy.stdout, heavy.stdout + heavy.stderr


@pytest.mark.parametrize("route", ["sampled", "hutchinson", "fd", "taylor"])
def test_return_stderr_matches_the_spread_of_repeated_estimates(route):
    """The reported standard error of a ``samples``-draw estimate equals the
    spread of such estimates over independent seeds (ratio within [0.6, 1.6]
    at 40 repeats: the sample std of 40 values is within ±25% of the truth at
    ~4 sigma), and the value is the one returned without ``return_stderr``."""
    case = dct.build_case(dict(ALL_KINDS, blocks=[("dropout", 0.3), ("locked", 0.2), ("attention", 0.3)]))
    m, x, y = case.model, case.inputs, case.targets

    def call(seed, **kw):
        if route == "taylor":
            return dc.taylor_regularizer(m, x, y, estimator="hutchinson", samples=8, generator=seed, **kw)
        return dc.explicit_regularizer(m, x, y, estimator=route, samples=8, generator=seed, **kw)

    ests = [call(s, return_stderr=True) for s in range(40)]
    assert float(ests[0].value.detach()) == float(call(0).detach()) and ests[0].samples == 8
    vals = torch.tensor([float(e.value.detach()) for e in ests], dtype=torch.float64)
    ratio = float(vals.std()) / (sum(e.stderr for e in ests) / len(ests))
    assert 0.6 < ratio < 1.6, ratio
    per = dc.explicit_regularizer(m, x, y, estimator="hutchinson", samples=8, generator=0, per_site=True,
                                  return_stderr=True) if route == "hutchinson" else None
    if per is not None:
        assert set(per) == {s.name for s in dc.find_sites(m, x)} and all(e.stderr > 0 for e in per.values())
    with pytest.raises(dc.DropcheckError, match="samples >= 2"):
        if route == "taylor":
            dc.taylor_regularizer(m, x, y, estimator="hutchinson", samples=1, return_stderr=True)
        else:
            dc.explicit_regularizer(m, x, y, estimator=route, samples=1, return_stderr=True)
