"""Noise structures other than per-position: locked (variational) dropout and
DropConnect, with every estimator against a brute-force second-order form
that uses the site's own mask structure.

- Locked site, input ``(T, B, D)``: one η per (sequence, unit), so
  ``C[(t,b,k),(s,b',k')] = h_tbk h_sbk 1[b = b', k = k']`` (cross-time terms).
- DropConnect on ``W``: one η per weight, shared by the whole batch; the
  penalty is ``λ ⟨(1/N) Σ_n J_nᵀ H_n J_n, diag(W²)⟩`` on the batch-mean loss.

The networks are built here: an Elman RNN written with ``nn.Linear`` in a
Python loop (LockedDropout on its input and on its outputs), ``nn.RNN``
wrapped in ``dc.WeightDrop``, ``dc.WeightDrop(nn.Linear)`` and a module
applying ``dc.DropConnect`` to its own weight.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dropcheck as dc




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
TOL = 1e-9


def locked_rnn(hidden=3, T=4, B=2, seed=1, q_in=0.3, q_out=0.2):
    """Input correlated over time (x_t = x_0 + 0.3 noise_t, like repeated
    tokens), so the cross-time terms of the input site are large."""
    model = cases.ElmanLocked(d=2, hidden=hidden, classes=3, q_in=q_in, q_out=q_out, seed=seed)
    X, y = cases.seq_data(T, B, 2, 3, seed=seed)
    return model, X[:1].expand_as(X) + 0.3 * X, y


def weightdrop_rnn(hidden=3, T=4, B=2, seed=2, q=0.3):
    model = cases.WeightDropRNN(d=2, hidden=hidden, classes=3, q=q, seed=seed)
    X, y = cases.seq_data(T, B, 2, 3, seed=seed)
    return model, X, y


def weightdrop_linear(seed=3, q=0.4, n=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), dc.WeightDrop(nn.Linear(3, 3), ["weight"], q)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    X, y = cases.data(n, 3, 3, seed=seed)
    return model, X, y


def dropconnect_module(seed=4, q=0.3, n=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3).double(), nn.Tanh(), cases.DropConnectLinear(3, 3, q, seed=seed))
    X, y = cases.data(n, 3, 3, seed=seed)
    return model, X, y


def mixed(seed=5):
    """Locked input dropout, an nn.RNN with DropConnect on its recurrent weight."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = dc.LockedDropout(0.25)
            self.rnn = dc.WeightDrop(nn.RNN(2, 2), ["weight_hh_l0"], 0.35)
            self.dec = nn.Linear(2, 3)

        def forward(self, x):
            return self.dec(self.rnn(self.lock(x))[0])

    torch.manual_seed(seed)
    model = Mixed().double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)
    X, y = cases.seq_data(3, 2, 2, 3, seed=seed)
    return model, X, y


MODELS = {
    "locked_rnn": locked_rnn,
    "weightdrop_rnn": weightdrop_rnn,
    "weightdrop_linear": weightdrop_linear,
    "dropconnect_module": dropconnect_module,
    "mixed": mixed,
}


@pytest.fixture(params=list(MODELS))
def case(request):
    return MODELS[request.param]()


def test_sites_have_their_structure(case):
    model, X, y = case
    kinds = {s.structure for s in dc.find_sites(model)}
    assert kinds <= {"locked", "weight"} and kinds


def test_exact_matches_dense_route(case):
    model, X, y = case
    assert checks.check_explicit_exact(model, X, y) < TOL
    assert checks.check_explicit_exact(model, X, y, weighted=False) < TOL
    assert checks.check_explicit_exact(model, X, y, hessian="identity") < TOL


def test_taylor_matches_dense_hessian(case):
    model, X, y = case
    assert checks.check_taylor(model, X, y) < TOL


@pytest.mark.parametrize("estimator", ["sampled", "hutchinson", "fd"])
def test_stochastic_estimators_unbiased_light(case, estimator):
    """60 calls × 8 probes vs the dense structured value; |z| < 4.5 (6.8e-6 per
    test for a Gaussian statistic)."""
    model, X, y = case
    z = checks.check_estimator_unbiased(model, X, y, estimator, calls=60, samples=8, seed=17)
    assert abs(z) < stats.Z_MAX, z


@pytest.mark.heavy
@pytest.mark.parametrize("estimator", ["sampled", "hutchinson", "fd"])
def test_stochastic_estimators_unbiased_heavy(case, estimator):
    model, X, y = case
    z = checks.check_estimator_unbiased(model, X, y, estimator, calls=600, samples=8, seed=99)
    assert abs(z) < stats.Z_MAX, z


def test_fd_equals_hutchinson_same_probe(case):
    """fd's probe is the same Rademacher draw as hutchinson's (shared over
    time for locked sites, one per weight for DropConnect)."""
    model, X, y = case
    for seed in range(2):
        h = dc.explicit_regularizer(model, X, y, estimator="hutchinson", generator=seed, per_site=True)
        f = dc.explicit_regularizer(model, X, y, estimator="fd", generator=seed, per_site=True)
        for k in h:
            assert stats.rel(float(f[k].detach()), float(h[k].detach())) < 1e-6


def test_locked_is_not_the_per_position_formula():
    """A locked site's value includes the cross-time terms.  On the RNN's input
    site (it feeds the recurrence, so the logits at time t depend on h_s for
    s <= t) dropcheck equals the locked form and differs from the
    per-position form (diag(h²)) by exactly the cross-time part, > 5% here
    (input correlated over time, like repeated tokens).  On the output site,
    followed only by the per-position decoder, the cross-time terms vanish
    identically (J_n touches one time step), so both forms agree."""
    model, X, y = locked_rnn(hidden=3, T=4, B=2, seed=1)
    got = {k: float(v.detach()) for k, v in dc.explicit_regularizer(model, X, y, per_site=True).items()}
    locked = refs.bf_explicit(model, X, y)
    perpos = refs.bf_explicit(model, X, y, moment=refs.per_position_moment)
    cross = refs.bf_explicit(model, X, y, moment=lambda c: refs.second_moment(c) - refs.per_position_moment(c))
    for k in got:
        assert stats.rel(got[k], locked[k]) < TOL
        assert abs((got[k] - perpos[k]) - cross[k]) < 1e-9 * abs(got[k])
    assert stats.rel(got["drop_in"], perpos["drop_in"]) > 0.05, (got, perpos)
    assert abs(cross["drop_out"]) < 1e-12 * got["drop_out"]
    # the same for the full Hessian (taylor) and for the gap's first-order limit
    t = {k: float(v.detach()) for k, v in dc.taylor_regularizer(model, X, y, per_site=True).items()}
    tp = refs.bf_taylor(model, X, y, moment=refs.per_position_moment)
    assert stats.rel(t["drop_in"], refs.bf_taylor(model, X, y)["drop_in"]) < TOL
    assert stats.rel(t["drop_in"], tp["drop_in"]) > 0.05, (t, tp)


@pytest.mark.parametrize("estimator", ["sampled", "hutchinson", "fd"])
def test_locked_estimators_follow_the_locked_structure(estimator):
    """The stochastic estimators share their draw over time (one label-noise sum
    per sequence and unit; one probe per sequence and unit): on the input site
    (cross-time part 11% of the value) 200 calls × 8 draws are unbiased for the
    locked value (|z| < 4.5, 6.8e-6) and reject the per-position value
    (|z| > 4.5; measured |z| ≈ 6.5 for sampled, ≈ 25 for hutchinson/fd)."""
    model, X, y = locked_rnn()
    perpos = refs.bf_explicit(model, X, y, moment=refs.per_position_moment)["drop_in"]
    z = checks.check_estimator_unbiased(model, X, y, estimator, calls=200, samples=8, seed=23, key="drop_in")
    z_pp = checks.check_estimator_unbiased(model, X, y, estimator, calls=200, samples=8, seed=23, key="drop_in",
                                      target=perpos)
    assert abs(z) < stats.Z_MAX, z
    assert abs(z_pp) > stats.Z_MAX, z_pp


# tiny versions (≤ 9 noise units) for enumeration
TINY = {
    "locked_rnn": lambda: locked_rnn(hidden=2, T=3, B=2, seed=1),  # 4 + 4 units
    "weightdrop_rnn": lambda: weightdrop_rnn(hidden=3, T=3, B=2, seed=2),  # 9 units
    "weightdrop_linear": lambda: weightdrop_linear(seed=3, n=3),  # 9 units
    "dropconnect_module": lambda: dropconnect_module(seed=4, n=3),  # 9 units
    "mixed": lambda: mixed(seed=5),  # 4 + 4 units
}


@pytest.mark.parametrize("name", list(TINY))
def test_first_order_identity_with_real_masks(name):
    """``lim R_drop/q = Σ_u Δ_u`` with Δ_u the deletion of a whole unit (a
    feature at every time step; one weight for the whole batch): at q = 1e-5
    the test's own enumeration of the real masks / q and dc's exact gap / q
    both match ``first_order_gap`` to O(q) (< 1e-3), and ``first_order_gap``
    matches the test's own deletion loop."""
    model, X, y = TINY[name]()
    r = checks.check_first_order(model, X, y, 1e-5)
    assert r["own gap/q vs first_order"] < 1e-3, r
    assert r["gap/q vs first_order"] < 1e-3, r
    assert r["first_order vs loop"] < 1e-12, r
    assert r["gap abs err"] <= 1e-9 * abs(r["first_order"] * 1e-5) + r["rounding bound"], r


@pytest.mark.parametrize("name", ["locked_rnn", "weightdrop_linear"])
def test_monte_carlo_gap_unbiased_structured_light(name):
    """Monte Carlo gap with the site's own structure vs the test's enumeration,
    3000 draws, |z| < 4.5."""
    model, X, y = TINY[name]()
    exact = refs.bf_gap_enum(model, X, y)
    est = dc.dropout_gap(model, X, y, samples=3000, generator=4)
    assert abs(est.value - exact) < stats.Z_MAX * est.stderr, (est, exact)


def test_implicit_noise_covariance_structured(case):
    """ξ_approx draws one η per sequence and unit (locked) / per weight
    (DropConnect): its covariance matches the dense Jacobian route."""
    model, X, y = case
    assert checks.check_noise_cov_exact(model, X, y) < 1e-10


def test_implicit_noise_empirical_covariance_locked_light():
    model, X, y = locked_rnn()
    z = checks.check_noise_cov_empirical(model, X, y, n=300, seed=6)
    assert all(abs(v) < stats.Z_MAX for v in z.values()), z


def test_independent_positions_option_drops_exactly_the_cross_time_terms():
    """`independent_positions=True` (the official code's treatment of locked
    sites) equals the brute-force per-position form; the default keeps the
    locked form; every estimator follows the option."""
    from dropcheck._cases import TinyLockedRNN
    from dropcheck._reference import dense_explicit

    model = TinyLockedRNN(seed=3)
    g = torch.Generator().manual_seed(11)
    X = torch.randn(5, 2, 2, generator=g, dtype=torch.float64).cumsum(0)  # time-correlated inputs
    y = torch.randint(0, 3, (5, 2), generator=g)
    with torch.no_grad():  # values only
        locked = dc.explicit_regularizer(model, X, y, per_site=True)
        perpos = dc.explicit_regularizer(model, X, y, per_site=True, independent_positions=True)
    # the input site feeds the recurrence: its cross-time terms are not zero
    assert abs(float(locked["drop_in"]) / float(perpos["drop_in"]) - 1) > 1e-3
    # the output site feeds only the per-position decoder: no cross-time terms
    assert float(locked["drop_out"]) == pytest.approx(float(perpos["drop_out"]), rel=1e-12)
    # route B: the same net with its locked sites swapped for per-position nn.Dropout
    import copy

    swapped = copy.deepcopy(model)
    swapped.drop_in, swapped.drop_out = torch.nn.Dropout(model.drop_in.p), torch.nn.Dropout(model.drop_out.p)
    dense = dense_explicit(swapped, X, y)
    for k in perpos:
        assert float(perpos[k].detach()) == pytest.approx(dense[k], rel=1e-10)
    # the fd estimator with the same probe follows the option (O(eps^2))
    fd = dc.explicit_regularizer(model, X, y, estimator="fd", per_site=True, independent_positions=True,
                                 generator=4, eps=1e-5)
    hu = dc.explicit_regularizer(model, X, y, estimator="hutchinson", per_site=True, independent_positions=True,
                                 generator=4)
    for k in fd:
        assert float(fd[k].detach()) == pytest.approx(float(hu[k].detach()), rel=1e-6)
    # implicit noise: per-position η has the per-position covariance; both routes agree
    a = dc.implicit_noise(model, X, y, generator=2, independent_positions=True)
    b = dc.implicit_noise(model, X, y, generator=2, independent_positions=True, estimator="fd", eps=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-9)
