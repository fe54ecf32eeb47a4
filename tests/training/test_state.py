"""``RunState``: save, load, equal — on its own, without a training run."""

from __future__ import annotations

import math

import torch

from training.pipeline.rules import Gens
from training.pipeline.state import Counters, RunState


def _state(seed: int) -> RunState:
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(seed + 1)
    data = torch.Generator().manual_seed(seed + 2)
    hidden = [(torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)) for _ in range(2)]
    st = RunState(data, Gens(g, shared), hidden)
    st.counters = Counters(step=7, epoch=1, pos=40, best_valid=123.5, best_step=5, best_eval=2, lr_scale=0.25,
                           evals=3, log_lines=4, train_time=1.5, interval_time=0.5, interval_tokens=80, tokens_seen=560)
    st.accumulate(torch.tensor(2.5), {"R": torch.tensor(0.125)})
    st.accumulate(torch.tensor(1.5), {"R": torch.tensor(0.375), "R/hidden": torch.tensor(1.0)})
    return st


def _draws(st: RunState) -> list:
    return [torch.rand(3, generator=st.gens.local), torch.rand(3, generator=st.gens.shared),
            torch.rand(3, generator=st.data_gen)]


def test_run_state_round_trips_exactly():
    a = _state(0)
    saved = a.state_dict()
    b = _state(99)  # different everything
    b.load_state_dict(saved)
    assert b.counters == a.counters
    assert b.steps == a.steps == 2 and float(b.loss_sum) == float(a.loss_sum) == 4.0
    assert {k: float(v) for k, v in b.reg_sum.items()} == {"R": 0.5, "R/hidden": 1.0}
    for (h1, c1), (h2, c2) in zip(a.hidden, b.hidden):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)
    # every generator continues with the same numbers
    for x, y in zip(_draws(a), _draws(b)):
        assert torch.equal(x, y)


def test_saving_does_not_alias_the_live_state():
    a = _state(0)
    saved = a.state_dict()
    a.accumulate(torch.tensor(10.0), {})
    a.counters.step += 1
    b = _state(5)
    b.load_state_dict(saved)
    assert b.counters.step == 7 and float(b.loss_sum) == 4.0


def test_reset_interval_clears_the_accumulators_only():
    a = _state(0)
    a.reset_interval()
    assert a.steps == 0 and float(a.loss_sum) == 0.0 and a.reg_sum == {}
    assert a.counters.interval_time == 0.0 and a.counters.interval_tokens == 0 and a.counters.step == 7


def test_a_checkpoint_without_gradient_sums_leaves_its_interval_unknown():
    """A checkpoint from before ``grad_norm`` was logged holds no gradient
    sums: the interval it resumes already has steps whose norms are lost, so
    its means must come out NaN, not a sum of the later steps over all of them."""
    a = _state(0)
    a.accumulate(torch.tensor(1.0), {}, {"norm": torch.tensor(0.5), "clipped": torch.tensor(True)})
    full = a.state_dict()
    b = _state(7)
    b.load_state_dict(full)
    assert {k: float(v) for k, v in b.grad_sum.items()} == {"norm": 0.5, "clipped": 1.0}
    old = a.state_dict()
    del old["rank"]["acc"]["grad"]
    b.load_state_dict(old)
    b.accumulate(torch.tensor(1.0), {}, {"norm": torch.tensor(0.25), "clipped": torch.tensor(False)})
    assert b.steps == 4 and set(b.grad_sum) == {"norm", "clipped"}
    assert all(math.isnan(float(v)) for v in b.grad_sum.values())
    b.reset_interval()  # the next interval is whole again
    b.accumulate(torch.tensor(1.0), {}, {"norm": torch.tensor(0.25), "clipped": torch.tensor(False)})
    assert float(b.grad_sum["norm"]) == 0.25
