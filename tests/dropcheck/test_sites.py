"""Dropout sites, their noise structure, and analytic mode."""

from __future__ import annotations


import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import dropcheck as dc




import dc_cases as cases
import dc_references as refs
import dc_stats as stats


# ---------------------------------------------------------------------------
# discovery


@given(st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.1, 0.5, 0.9]), min_size=1, max_size=5))
@example([0.0, 0.3])
def test_every_positive_dropout_is_a_site_zero_is_not(ps):
    """A stack of Linear → Dropout(p_j): exactly the p > 0 modules are sites,
    with q = p, λ = q/(2(1−q)) and Var(η) = q/(1−q)."""
    layers = []
    for p in ps:
        layers += [nn.Linear(3, 3).double(), nn.Dropout(p)]
    layers.append(nn.Linear(3, 2).double())
    model = nn.Sequential(*layers)
    expected = {str(2 * j + 1): p for j, p in enumerate(ps) if p > 0}
    if not expected:
        with pytest.raises(dc.NoDropoutSiteError):
            dc.find_sites(model)
        return
    sites = dc.find_sites(model)
    assert {s.name: s.q for s in sites} == expected
    for s in sites:
        assert s.structure == "position" and s.noise == "bernoulli"
        assert s.lam == pytest.approx(s.q / (2 * (1 - s.q)), rel=1e-15)
        assert s.variance == pytest.approx(s.q / (1 - s.q), rel=1e-15)
    X, y = cases.data(2, 3, 2, seed=0)
    assert set(dc.explicit_regularizer(model, X, y, per_site=True)) == set(expected)


def test_site_kinds():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Dropout(0.2)
            self.b = dc.LockedDropout(0.3)
            self.c = dc.GaussianDropout(0.1)
            self.d = dc.WeightDrop(nn.Linear(2, 2), ["weight"], 0.4)
            self.e = nn.Dropout2d(0.25)
            self.f = dc.LockedDropout(0.0)
            self.g = dc.GaussianDropout(0.0)

    got = {s.name: (s.q, s.noise, s.structure) for s in dc.find_sites(Net())}
    assert got == {
        "a": (0.2, "bernoulli", "position"),
        "b": (0.3, "bernoulli", "locked"),
        "c": (0.1, "gaussian", "position"),
        "d.drop.weight": (0.4, "bernoulli", "weight"),
        "e": (0.25, "bernoulli", "channel"),
    }


class Twice(nn.Module):
    """One Dropout module applied to two different activations."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 3).double()
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(3, 3).double()

    def forward(self, x):
        h = torch.tanh(self.l1(self.drop(x)))
        return self.l2(self.drop(h))


def test_module_called_twice_gives_two_occurrences():
    torch.manual_seed(0)
    model = Twice()
    X, y = cases.data(2, 3, 3, seed=1)
    with dc.analytic_mode(model) as session:
        model(X)
    assert [o.key for o in session.occurrences] == ["drop", "drop#1"]
    assert [o.index for o in session.occurrences] == [0, 1]
    got = {k: float(v.detach()) for k, v in dc.explicit_regularizer(model, X, y, per_site=True).items()}
    ref = refs.bf_explicit(model, X, y)
    assert set(got) == {"drop", "drop#1"} == set(ref)
    assert all(stats.rel(got[k], ref[k]) < 1e-9 for k in ref)
    # independent noise per occurrence: 2 × 6 units enumerated
    assert dc.dropout_gap(model, X[:1], y[:1], exact=True).samples == 2**6


# ---------------------------------------------------------------------------
# analytic mode restores the model


def _model_with_all_sites():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()
            self.d0 = nn.Dropout(0.2)
            self.d1 = dc.GaussianDropout(0.3)
            self.wd = dc.WeightDrop(nn.Linear(3, 3).double(), ["weight"], 0.4)

        def forward(self, x):
            return self.wd(self.d1(torch.tanh(self.lin(self.d0(x)))))

    return Net()


def _state(model):
    return [(n, m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_flags_and_hooks_restored_even_on_exception(mode):
    model = _model_with_all_sites()
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.d1.eval()
    calls = []
    model.d0.register_forward_hook(lambda m, a, o: calls.append(1))  # a user's own hook survives
    before = _state(model)
    X, y = cases.data(2, 3, 3, seed=0)

    with pytest.raises(RuntimeError, match="boom"):
        with dc.analytic_mode(model):
            assert not model.d0.training and not model.d1.training
            model(X)
            raise RuntimeError("boom")
    assert _state(model) == before

    with pytest.raises(dc.DropcheckError):  # raised inside dropcheck after the forward pass
        dc.explicit_regularizer(model, X, y[:1])
    assert _state(model) == before
    n = len(calls)
    model(X)
    assert len(calls) == n + 1


def test_analytic_mode_makes_sites_the_identity():
    model = _model_with_all_sites().train()
    X, _ = cases.data(4, 3, 3, seed=2)
    with dc.analytic_mode(model):
        a = model(X)
    ref = refs.Wired(model).logits(X)  # every site replaced by the identity
    assert torch.equal(a, ref)
    b = model(X)  # dropout is active again in training mode
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------
# the site modules themselves (training mode)


def test_weightdrop_keeps_parameters_in_place_and_trains():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    W0 = lin.weight.detach().clone()
    wd = dc.WeightDrop(lin, ["weight"], 0.5)
    assert [n for n, _ in wd.named_parameters()] == ["module.weight", "module.bias"]
    assert wd.module.weight is lin.weight
    wd.train()
    X = torch.cat([torch.eye(4), torch.eye(4)]).double()  # rows e_k, twice
    out = wd(X)
    Wd = (out[:4] - lin.bias).detach().T  # the dropped weight, column by column
    assert torch.allclose(out[:4], out[4:])  # one mask for the whole batch
    kept = Wd != 0
    assert torch.allclose(Wd[kept], 2.0 * W0[kept])  # m/(1−q) with q = 0.5
    # gradient flows to the parameter through the mask
    (out**2).sum().backward()
    g_Wd = 2 * 2 * (out[:4] - 0).detach().T  # d/dWd of Σ over both copies of (Wd e_k + b)²
    assert torch.allclose(lin.weight.grad, 2.0 * kept * g_Wd)
    opt = torch.optim.SGD(wd.parameters(), lr=0.1)
    opt.step()
    assert wd.module.weight is lin.weight and not torch.equal(lin.weight.detach(), W0)
    wd.eval()
    assert torch.allclose(wd(X), lin(X))
    # different calls draw different masks
    wd.train()
    outs = {tuple((wd(X[:4]) - lin.bias).detach().T.ne(0).reshape(-1).tolist()) for _ in range(20)}
    assert len(outs) > 1


def test_weightdrop_rnn_trains():
    torch.manual_seed(1)
    model = cases.WeightDropRNN(seed=1).train()
    X, y = cases.seq_data(3, 2, 2, 3, seed=1)
    loss = torch.nn.functional.cross_entropy(model(X).reshape(-1, 3), y.reshape(-1))
    loss.backward()
    g = model.rnn.module.weight_hh_l0.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert "rnn.module.weight_hh_l0" in dict(model.named_parameters())


@pytest.mark.parametrize("time_dim", [0, 1])
def test_locked_dropout_mask_shared_over_time(time_dim):
    torch.manual_seed(2)
    drop = dc.LockedDropout(0.4, time_dim=time_dim).train()
    h = torch.rand(5, 6, 7, dtype=torch.float64) + 0.5
    ratio = drop(h) / h
    first = ratio.select(time_dim, 0).unsqueeze(time_dim)
    assert torch.allclose(ratio, first.expand_as(ratio), rtol=1e-14, atol=0)
    vals = set(torch.round(ratio * 1e6).unique().tolist())
    assert vals <= {0.0, round(1e6 / 0.6)}
    assert drop.eval()(h) is h


def test_gaussian_dropout_moments_light():
    """η = out/h − 1 over 2e5 entries: mean 0 and variance q/(1−q); |z| < 4.5
    (6.8e-6 each; the variance's z uses the sample fourth moment)."""
    torch.manual_seed(3)
    q = 0.3
    h = torch.full((200_000,), 2.0, dtype=torch.float64)
    eta = dc.GaussianDropout(q).train()(h) / h - 1
    assert abs(stats.zscore(eta, 0.0)) < stats.Z_MAX
    assert abs(stats.zscore(eta**2, q / (1 - q))) < stats.Z_MAX


def test_dropconnect_module_one_mask_per_call():
    torch.manual_seed(4)
    d = dc.DropConnect(0.25).train()
    W = torch.rand(6, 6, dtype=torch.float64) + 1
    out = d(W)
    assert set(torch.round(out / W * 1e6).unique().tolist()) <= {0.0, round(1e6 / 0.75)}
    assert d.eval()(W) is W


def test_with_drop_probability_copies_and_sets_every_active_module_site():
    """Sites at q > 0 (nn.Dropout, LockedDropout, timm-style DropPath, which
    keeps q in ``drop_prob``) get the new q in a copy; a q = 0 module stays
    off; the original model is untouched; q outside [0, 1) is refused."""
    from model_zoo import DropPath

    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3), dc.LockedDropout(0.2), nn.Dropout(0.0), DropPath(0.1))
    moved = dc.with_drop_probability(model, 0.05)
    assert sorted((s.name, s.q) for s in dc.find_sites(moved)) == [("1", 0.05), ("2", 0.05), ("4", 0.05)]
    assert moved[3].p == 0.0 and not hasattr(moved[4], "p")
    assert [s.q for s in dc.find_sites(model)] == [0.3, 0.2, 0.1]
    assert moved[0].weight is not model[0].weight
    torch.testing.assert_close(moved[0].weight, model[0].weight)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(dc.DropcheckError, match="drop probability q must lie in"):
            dc.with_drop_probability(model, bad)
