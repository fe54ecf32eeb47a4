"""``dc.dropout_gap`` and ``dc.first_order_gap``: when the second-order picture holds.

True properties (MATH.md, "When the second-order picture holds"):

- first order in q: ``lim_{q→0} R_drop/q = Σ_i Σ_k Δ_ik`` (deletion minus its
  linear prediction), checked against an exact enumeration of the masks and
  the test's own deletion loop;
- Bernoulli dropout: ``R_drop/R_taylor`` tends to that limit divided by
  ``R_taylor/q → ½ Σ h² ∂²ℓ``, which is NOT 1 in general; it approaches 1 as
  layers widen (each unit's deletion small);
- Gaussian multiplicative noise: ``R_drop = R_taylor + O(q²)``, so the ratio
  does tend to 1 as ``q → 0``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, example, given, settings

import dropcheck as dc




import dc_cases as cases
import dc_checks as checks
import dc_references as refs
import dc_stats as stats
import dc_strategies as strategies

with_q = dc.with_drop_probability


def n_units(case):
    sizes = case["sizes"]
    return case["n"] * sum(sizes[k] for k in case["sites"])


def taylor(model, X, y, **kw):
    return float(dc.taylor_regularizer(model, X, y, **kw).detach())


# ---------------------------------------------------------------------------
# the first-order identity (exact enumeration at tiny q)

Q_SMALL = 1e-5
# R_drop/q − ΣΔ = O(q): pairs of deletions (prob ~q²) and the kept units'
# q/(1−q) scaling; 1e-3 = 100 q leaves room for constants of order 10-100.
FIRST_ORDER_TOL = 1e-3


def _assert_first_order(model, X, y):
    r = checks.check_first_order(model, X, y, Q_SMALL)
    assert r["gap/q vs first_order"] < FIRST_ORDER_TOL, r
    assert r["first_order vs loop"] < 1e-12, r
    assert r["own gap/q vs first_order"] < FIRST_ORDER_TOL, r
    # dc's enumeration vs the test's own (dc sums prob·L over 2^M masks, then
    # subtracts L0: rounding bound 4·2^M·u·(|L0| + 1), see helpers)
    assert r["gap abs err"] <= 1e-9 * abs(r["first_order"] * Q_SMALL) + r["rounding bound"], r
    return r




@given(strategies.mlp_cases(acts=tuple(cases.SMOOTH_ACTS), max_hidden=1, max_n=2, max_width=3))
@example(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.2}, scale=2.0, n=1, seed=0))
@example(dict(sizes=[2, 4], acts=[], sites={0: 0.5}, scale=3.0, n=2, seed=3))  # softmax regression
def test_first_order_identity_mlp(case):
    """Exact enumeration (≤ 12 noise units) at q = 1e-5: dc.dropout_gap/q and
    the test's own enumeration/q vs dc.first_order_gap (< 1e-3, the O(q)
    remainder), first_order_gap vs the test's own deletion loop (< 1e-12),
    dc's enumeration vs the test's own (to rounding)."""
    assume(n_units(case) <= 12)
    model, X, y = cases.build(case)
    _assert_first_order(model, X, y)


def test_exact_gap_reports_enumeration():
    model, X, y = cases.build(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=1, seed=4))
    got = dc.dropout_gap(model, X, y, exact=True)
    assert got.stderr == 0.0 and got.samples == 2**6


def test_exact_gap_matches_own_enumeration_moderate_q():
    """The exact enumeration is a float64 reference: it must agree with the
    test's own enumeration of the same masks to rounding (64 masks: < 1e-12).
    (Found failing at 1e-8: η was built in float32; fixed in 862eae8.)"""
    model, X, y = cases.build(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=1, seed=4))
    assert stats.rel(dc.dropout_gap(model, X, y, exact=True).value, refs.bf_gap_enum(model, X, y)) < 1e-12


def test_exact_gap_matches_own_enumeration_tiny_q():
    """At q = 1e-5 (where the first-order identity is checked): agreement to the
    rounding bound of summing 2^M terms of size L (helpers.check_first_order)."""
    model, X, y = cases.build(dict(sizes=[1, 2], acts=[], sites={0: 0.5}, scale=1.0, n=1, seed=0))
    r = checks.check_first_order(model, X, y, Q_SMALL)
    assert r["gap abs err"] <= 1e-9 * abs(r["first_order"] * Q_SMALL) + r["rounding bound"], r


# ---------------------------------------------------------------------------
# Monte Carlo gap: unbiased, with an honest standard error


@pytest.mark.parametrize("control_variate", [False, True])
def test_monte_carlo_gap_unbiased_light(control_variate):
    """One call with 3000 draws: |value − exact| < 4.5 stderr (6.8e-6 for a
    Gaussian statistic; the mean of 3000 draws is close to Gaussian)."""
    model, X, y = cases.build(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=1, seed=4))
    exact = refs.bf_gap_enum(model, X, y)
    est = dc.dropout_gap(model, X, y, samples=3000, generator=21, control_variate=control_variate)
    assert est.samples == 3000
    assert abs(est.value - exact) < stats.Z_MAX * est.stderr, (est, exact)


def test_monte_carlo_stderr_is_honest_light():
    """40 independent calls of 100 draws: the spread of the values matches the
    reported stderr.  With k = 40, s²/σ² ~ χ²_39/39; P(ratio ∉ [0.5, 1.6]) ≈ 4e-4
    (two-sided, for the sample std over the mean reported stderr)."""
    model, X, y = cases.build(dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: 0.3, 1: 0.4}, scale=2.0, n=1, seed=4))
    g = cases.gen(3)
    ests = [dc.dropout_gap(model, X, y, samples=100, generator=g) for _ in range(40)]
    vals = [e.value for e in ests]
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    se = math.sqrt(sum(e.stderr**2 for e in ests) / len(ests))
    assert 0.5 < sd / se < 1.6, sd / se


@pytest.mark.heavy
def test_monte_carlo_gap_unbiased_heavy():
    """20 independent calls × 5000 draws each on a locked RNN: every |z| < 4.5
    (Bonferroni: < 1.4e-4 for the whole test)."""
    model = cases.ElmanLocked(d=2, hidden=2, seed=2)
    X, y = cases.seq_data(3, 2, 2, 3, seed=2)
    exact = refs.bf_gap_enum(model, X, y)
    g = cases.gen(8)
    for _ in range(20):
        est = dc.dropout_gap(model, X, y, samples=5000, generator=g)
        assert abs(est.value - exact) < stats.Z_MAX * est.stderr, (est, exact)


# ---------------------------------------------------------------------------
# Bernoulli: the ratio tends to the deletion limit, not to 1


def test_bernoulli_ratio_tends_to_deletion_limit_not_one():
    """Width-5 tanh net with large weights: ``R_drop/R_taylor`` at q = 1e-2 and
    1e-3 (exact enumeration) approaches ``first_order_gap/(R_taylor(unweighted)/2)``
    with an O(q) error, and that limit is far from 1 (2.12 here)."""
    base = cases.mlp([3, 5, 3], ["tanh"], {1: 0.01}, seed=2, scale=3.0, out_scale=6.0)
    X, y = cases.data(1, 3, 3, seed=2)
    lim, lim_e = checks.limit_ratio(base, X, y)
    assert stats.rel(lim, lim_e) < 1e-9  # only softmax follows: taylor = explicit
    assert lim > 1.5, lim
    errs = []
    for q in (1e-2, 1e-3):
        m = with_q(base, q)
        ratio = dc.dropout_gap(m, X, y, exact=True).value / taylor(m, X, y)
        errs.append(abs(ratio / lim - 1))
        assert abs(ratio - 1) > 0.5  # never "→ 1"
    assert errs[0] < 10 * 1e-2 and errs[1] < 10 * 1e-3, errs
    assert errs[1] < 0.2 * errs[0], errs  # O(q): ×10 smaller q, ≥ ×5 smaller error


WIDTHS_LIGHT = (4, 16, 64)


def _width_ratios(seed, widths):
    out = []
    for w in widths:
        model = cases.width_net(w, seed=seed)
        X, y = cases.data(8, 4, 3, seed=seed)
        r_t, r_e = checks.limit_ratio(model, X, y)
        assert stats.rel(r_t, r_e) < 1e-9  # two routes to R_taylor agree (linear tail)
        out.append(r_t)
    return out


@pytest.mark.parametrize("seed", [0, 2])
def test_limit_ratio_tends_to_one_as_width_grows(seed):
    """tanh layer, output weights scaled by 1/sqrt(width): the q → 0 limit of
    R_drop/R_taylor (deterministic) moves monotonically towards 1 and is within
    2% of 1 at width 64 (MATH.md quotes 1.153, 1.078, 1.025, 1.002 at widths
    4, 16, 64, 256 for its net)."""
    r = _width_ratios(seed, WIDTHS_LIGHT)
    dev = [abs(x - 1) for x in r]
    assert all(a > b for a, b in zip(dev, dev[1:])), r
    assert dev[0] > 0.05, r  # the small width is genuinely off
    assert dev[-1] < 0.02, r


@pytest.mark.heavy
def test_limit_ratio_width_trend_heavy():
    """Mean |ratio − 1| over 4 seeds at widths 4, 16, 64, 256: strictly
    decreasing, < 1% at width 256."""
    widths = (4, 16, 64, 256)
    devs = [[abs(x - 1) for x in _width_ratios(s, widths)] for s in range(4)]
    mean = [sum(d[i] for d in devs) / len(devs) for i in range(len(widths))]
    assert all(a > b for a, b in zip(mean, mean[1:])), mean
    assert mean[-1] < 0.01, mean


# ---------------------------------------------------------------------------
# Gaussian multiplicative noise: the ratio does tend to 1 as q → 0


def test_gaussian_gap_over_taylor_tends_to_one_quadrature():
    """Deterministic (Gauss-Hermite, 14 nodes per unit): |R_gauss/R_taylor − 1|
    falls at least like q (here faster) as q goes 0.2 → 0.05 → 0.0125; each
    quarter of q at least halves it, and it is < 2e-3 at q = 0.0125.  The
    Bernoulli net with the same weights stays far from 1."""
    devs = []
    for q in (0.2, 0.05, 0.0125):
        model, X, y = cases.gaussian_net(q)
        devs.append(abs(refs.bf_gaussian_gap(model, X, y, q) / taylor(model, X, y) - 1))
    assert all(b < 0.5 * a for a, b in zip(devs, devs[1:])), devs
    assert devs[-1] < 2e-3, devs
    bern = with_q(cases.mlp([3, 3, 3], ["tanh"], {1: 0.0125}, seed=4, scale=2.0, out_scale=3.0), 0.0125)
    _, X, y = cases.gaussian_net(0.0125)
    rb = dc.dropout_gap(bern, X, y, exact=True).value / taylor(bern, X, y)
    assert abs(rb - 1) > 0.1, rb


@pytest.mark.parametrize("q", [0.2, 0.0125])
def test_gaussian_monte_carlo_gap_matches_quadrature_light(q):
    """``dropout_gap(antithetic=True)`` on a GaussianDropout site vs quadrature:
    |z| < 4.5 (6.8e-6), 4000 antithetic pairs."""
    model, X, y = cases.gaussian_net(q)
    ref = refs.bf_gaussian_gap(model, X, y, q)
    est = dc.dropout_gap(model, X, y, samples=4000, antithetic=True, generator=5)
    assert abs(est.value - ref) < stats.Z_MAX * est.stderr, (est, ref)


def test_gaussian_gap_over_taylor_near_one_at_small_q_light():
    """Monte Carlo (antithetic) on a multi-example, two-site Gaussian net at
    q = 1e-3: |gap/taylor − 1| < 4.5 stderr/taylor + 5e-3 (the O(q) remainder
    allowance; quadrature puts it below 1e-3 already at q = 0.0125 on the
    3-unit net).  The same net with Bernoulli sites, exact enumeration: the
    ratio is off by > 5%."""
    q = 1e-3
    case = dict(sizes=[3, 3, 3], acts=["tanh"], sites={0: q, 1: q}, scale=2.5, n=1, seed=6)
    model, X, y = cases.build(case | dict(site_cls=dc.GaussianDropout))
    t = taylor(model, X, y)
    est = dc.dropout_gap(model, X, y, samples=4000, antithetic=True, generator=9)
    assert abs(est.value / t - 1) < stats.Z_MAX * est.stderr / t + 5e-3, (est, t)
    bern, _, _ = cases.build(case)
    rb = dc.dropout_gap(bern, X, y, exact=True).value / taylor(bern, X, y)
    assert abs(rb - 1) > 0.05, rb


@pytest.mark.heavy
@settings(max_examples=5)
@given(strategies.mlp_cases(acts=("tanh", "softplus", "sigmoid"), min_hidden=1, max_hidden=1))
def test_gaussian_gap_over_taylor_near_one_heavy(case):
    """Drawn nets with Gaussian sites at q = 1e-3, 20000 antithetic pairs:
    |gap/taylor − 1| < 4.5 stderr/taylor + 5e-3."""
    case = case | dict(sites={k: 1e-3 for k in case["sites"]}, site_cls=dc.GaussianDropout)
    model, X, y = cases.build(case)
    t = taylor(model, X, y)
    assume(t > 1e-8)
    est = dc.dropout_gap(model, X, y, samples=20000, antithetic=True, generator=case["seed"] % 997)
    assert abs(est.value / t - 1) < stats.Z_MAX * est.stderr / t + 5e-3, (est, t)


def test_gap_estimate_unpacks_as_value_and_stderr():
    import pickle

    import torch

    model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(2, 2)).double()
    X = torch.ones(1, 2, dtype=torch.float64)
    y = torch.tensor([1])
    est = dc.dropout_gap(model, X, y, exact=True)
    r, se = est  # DESIGN.md: R_drop, stderr
    assert (r, se) == (est.value, est.stderr) and se == 0.0 and est.samples == 4
    assert pickle.loads(pickle.dumps(est)).samples == 4
    assert "samples=4" in repr(est)


@pytest.mark.parametrize("blocks, scale, cv_wins", [
    ([("dropout", 0.1)], 0.5, True),  # near-linear: the first-order term is most of each draw's change
    ([("dropout", 0.5), ("dropout", 0.5)], 3.0, False),  # large weights, q = 0.5: deletions far from linear
])
def test_control_variate_auto_picks_the_form_with_the_smaller_error_bar(blocks, scale, cv_wins):
    import dropcheck.testing as dct

    c = dct.build_case(dict(blocks=blocks, d=4, classes=3, n=3, t=4, scale=scale, seed=2))
    m, x, y = c.model, c.inputs, c.targets
    plain = dc.dropout_gap(m, x, y, samples=300, generator=1)
    cv = dc.dropout_gap(m, x, y, samples=300, generator=1, control_variate=True)
    auto = dc.dropout_gap(m, x, y, samples=300, generator=1, control_variate="auto")
    assert (cv.stderr < plain.stderr) == cv_wins and auto.control_variate == cv_wins
    assert cv.control_variate and not plain.control_variate
    with pytest.raises(dc.DropcheckError, match="control_variate"):
        dc.dropout_gap(m, x, y, samples=10, control_variate="yes")


@pytest.mark.parametrize("spec", [
    dict(blocks=[("dropout", 0.3), ("locked", 0.2), ("attention", 0.3)], d=3, classes=3, n=3, t=3, scale=2.0,
         ignore=0.25, seed=1),
    dict(blocks=[("channel", 0.3), ("dropconnect", 0.2), ("drop_path", 0.3), ("functional", 0.1)], d=3, classes=3,
         n=2, t=3, scale=2.0, ignore=0.0, seed=4),
])
def test_first_order_gap_batched_deletions_equal_one_pass_per_unit(spec, monkeypatch):
    """The batched route (each example tiled, ``copies`` deletions per pass)
    gives the per-unit loop's value (``copies=1``) to rounding, site by site;
    DropConnect (noise shared over the batch) takes the loop inside the same call."""
    import dropcheck._gap as gap_mod
    import dropcheck.testing as dct

    c = dct.build_case(spec)
    loop = dc.first_order_gap(c.model, c.inputs, c.targets, per_site=True, copies=1)
    batched_sites = []
    real = gap_mod._tiled_deletions
    monkeypatch.setattr(gap_mod, "_tiled_deletions",
                        lambda m, t, occs, j, N: batched_sites.append(occs[j].key) or real(m, t, occs, j, N))
    fast = dc.first_order_gap(c.model, c.inputs, c.targets, per_site=True, copies=4)
    assert set(fast) == set(loop)
    for k in loop:
        assert fast[k] == pytest.approx(loop[k], rel=1e-9, abs=1e-13), k
    weight_sites = {k for k in loop if ".lin.drop." in k}
    assert set(batched_sites) == set(loop) - weight_sites and batched_sites
