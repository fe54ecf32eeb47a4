"""``taylor_regime``: its verdicts agree with the models' own Monte Carlo
gaps, drawn afresh (other seeds, more draws) by ``dropcheck.testing``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import dropcheck as dc
import dropcheck.testing as dct
import model_zoo as Z


def _rows_agree_with_own_gaps(report):
    for r in report.rows:  # dropcheck's R_drop and the model's own gap estimate the same number
        assert abs(dct.two_sample_z(r.own, r.own_stderr, r.r_drop, r.r_drop_stderr)) < dct.Z_MAX, r


def test_cnn_fails_at_every_q_and_a_fresh_own_gap_confirms_it():
    zoo = Z.cnn()
    rep = dc.taylor_regime(zoo.model, zoo.inputs, zoo.targets, qs=(0.01, 0.1), samples=300)
    print(rep)
    assert rep.q_holds is None and "not at any q tried" in rep.summary()
    assert abs(rep.limit_ratio - 1) > rep.rtol
    _rows_agree_with_own_gaps(rep)
    with pytest.raises(AssertionError, match="second-order picture fails"):
        dct.assert_second_order_holds(zoo.model, zoo.inputs, zoo.targets, 0.1, rtol=rep.rtol, samples=1500,
                                      generator=100)


def test_wide_last_layer_holds_and_a_fresh_own_gap_confirms_it():
    wide, x, y = Z.wide_last_layer_net()
    rep = dc.taylor_regime(wide, x, y, qs=(0.02, 0.1), samples=600)
    print(rep)
    assert rep.q_holds == 0.1 and rep.resolved and abs(rep.limit_ratio - 1) < 0.05
    _rows_agree_with_own_gaps(rep)
    dct.assert_second_order_holds(wide, x, y, 0.1, rtol=rep.rtol, samples=2000, generator=100)


def test_llama_at_hf_initialisation_agrees_with_its_own_gap_and_its_first_order_limit():
    if not os.environ.get("CI"):
        pytest.importorskip("transformers")
    zoo = Z.llama(std=None)  # HF's own initialisation (std 0.02): near the linear regime
    rep = dc.taylor_regime(zoo.model, zoo.inputs, zoo.targets, qs=(0.01, 0.3), samples=200)
    print(rep)
    _rows_agree_with_own_gaps(rep)
    small = rep.rows[0]  # at q = 0.01 R_drop is its first-order value q·ΣΔ up to O(q²)
    assert abs(small.r_drop - small.first_order) < dct.Z_MAX * small.r_drop_stderr
    # every q reported either resolved or, where not, said so
    assert all(r.holds in (True, False, None) for r in rep.rows)
    assert (rep.q_holds is None) == (abs(rep.limit_ratio - 1) > rep.rtol or rep.rows[0].holds is False)
