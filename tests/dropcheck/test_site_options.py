"""Per-site options of the public estimators: ``sites=`` (which sites take
part) and per-site generators (``generator={site: generator}``).

A site left out must behave exactly as if its ``q`` were 0: same values and
the same draws for the remaining sites, bit for bit in float64.  Per-site
generators must give every site the draws it gets from its own generator."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropcheck as dc
from dropcheck import DropcheckError

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Mixed(nn.Module):
    """Locked input dropout, a per-position ``nn.Dropout`` called twice
    (keys ``drop`` and ``drop#1``) and DropConnect on the decoder weight;
    input ``(T, B, 2)``, logits ``(T, B, 3)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = gen(seed)
        self.drop_in = dc.LockedDropout(0.3)
        self.lin = nn.Linear(2, 4).to(DT)
        self.drop = nn.Dropout(0.2)
        self.lin2 = nn.Linear(4, 4).to(DT)
        self.weight = nn.Parameter(torch.randn(3, 4, generator=g, dtype=DT))
        self.bias = nn.Parameter(torch.randn(3, generator=g, dtype=DT))
        self.dc = dc.DropConnect(0.25)
        with torch.no_grad():
            for p in (*self.lin.parameters(), *self.lin2.parameters()):
                p.copy_(1.5 * torch.randn(p.shape, generator=g, dtype=DT))

    def forward(self, x):
        h = torch.tanh(self.lin(self.drop_in(x)))
        h = torch.tanh(self.lin2(self.drop(h)))
        return F.linear(self.drop(h), self.dc(self.weight), self.bias)


class LinearHead(nn.Module):
    """Two ``nn.Dropout`` sites before a plain ``nn.Linear`` decoder (the
    (S4) and midpoint routes of ``analytic_dropout_objective``)."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Dropout(0.3)
        self.lin = nn.Linear(3, 5).to(DT)
        self.b = nn.Dropout(0.4)
        self.decoder = nn.Linear(5, 4).to(DT)

    def forward(self, x):
        return self.decoder(self.b(torch.tanh(self.lin(self.a(x)))))


SITES = ["drop_in", "drop", "dc"]


def mixed_case():
    model = Mixed()
    g = gen(7)
    X = torch.randn(3, 2, 2, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3, 2), generator=g)
    return model, X, y


def head_case():
    model = LinearHead()
    g = gen(8)
    return model, torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g)


def only(model: nn.Module, keep) -> nn.Module:
    """A copy of ``model`` whose dropout modules not in ``keep`` have q = 0."""
    m = copy.deepcopy(model)
    for s in dc.find_sites(m):
        if s.name not in keep:
            s.module.p = 0.0
    return m


def same(a, b):
    """Bit-for-bit equality of tensors, dicts of tensors or tuples of them."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, z in zip(a, b):
            same(x, z)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (a, b)
    else:
        assert a == b


def grads_of(model, t):
    names = [n for n, _ in model.named_parameters()]
    gs = torch.autograd.grad(t, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return dict(zip(names, gs))


# ---------------------------------------------------------------------------
# sites= equals q = 0 at the other sites, bit for bit

KEEPS = [["drop"], ["drop_in", "dc"], ["dc"]]


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("estimator", ["exact", "sampled", "hutchinson", "fd"])
@pytest.mark.parametrize("per_site", [False, True])
def test_explicit_regularizer_sites_equal_q_zero(keep, estimator, per_site):
    model, X, y = mixed_case()
    ref_model = only(model, keep)
    kw = dict(estimator=estimator, samples=2, per_site=per_site)
    a = dc.explicit_regularizer(model, X, y, sites=keep, generator=gen(3), **kw)
    b = dc.explicit_regularizer(ref_model, X, y, generator=gen(3), **kw)
    same(a, b)
    # the gradient in the parameters too
    if not per_site:
        same(grads_of(model, a), grads_of(ref_model, b))


@pytest.mark.parametrize("keep", KEEPS)
def test_taylor_and_loss_jacobian_sites_equal_q_zero(keep):
    model, X, y = mixed_case()
    ref_model = only(model, keep)
    same(dc.taylor_regularizer(model, X, y, sites=keep), dc.taylor_regularizer(ref_model, X, y))
    same(dc.taylor_regularizer(model, X, y, sites=keep, estimator="hutchinson", samples=2, generator=gen(4)),
         dc.taylor_regularizer(ref_model, X, y, estimator="hutchinson", samples=2, generator=gen(4)))
    same(dc.loss_jacobian_regularizer(model, X, y, sites=keep, per_site=True),
         dc.loss_jacobian_regularizer(ref_model, X, y, per_site=True))
    same(dc.first_order_gap(model, X, y, sites=keep, per_site=True), dc.first_order_gap(ref_model, X, y, per_site=True))


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("estimator", ["autograd", "fd"])
@pytest.mark.parametrize("noise", ["rademacher", "bernoulli"])
def test_implicit_noise_sites_equal_q_zero(keep, estimator, noise):
    model, X, y = mixed_case()
    ref_model = only(model, keep)
    same(dc.implicit_noise(model, X, y, sites=keep, estimator=estimator, noise=noise, generator=gen(5)),
         dc.implicit_noise(ref_model, X, y, estimator=estimator, noise=noise, generator=gen(5)))


@pytest.mark.parametrize("keep", KEEPS)
def test_dropout_gradients_gap_and_covariance_sites_equal_q_zero(keep):
    model, X, y = mixed_case()
    ref_model = only(model, keep)
    same(dc.dropout_gradient(model, X, y, sites=keep, generator=gen(6)), dc.dropout_gradient(ref_model, X, y, generator=gen(6)))
    same(dc.dropout_k_gradient(model, X, y, 3, sites=keep, generator=gen(6)),
         dc.dropout_k_gradient(ref_model, X, y, 3, generator=gen(6)))
    same(dc.noise_injected_dropout_k_gradient(model, X, y, 2, sites=keep, generator=gen(6)),
         dc.noise_injected_dropout_k_gradient(ref_model, X, y, 2, generator=gen(6)))
    same(dc.implicit_noise_covariance(model, X, y, sites=keep), dc.implicit_noise_covariance(ref_model, X, y))
    a = dc.dropout_gap(model, X, y, sites=keep, samples=20, generator=gen(9), control_variate=True)
    b = dc.dropout_gap(ref_model, X, y, samples=20, generator=gen(9), control_variate=True)
    assert (a.value, a.stderr, a.samples) == (b.value, b.stderr, b.samples)


def test_exact_gap_sites_equal_q_zero():
    model, X, y = head_case()
    for keep in (["a"], ["b"]):
        ref_model = only(model, keep)
        a = dc.dropout_gap(model, X, y, sites=keep, exact=True)
        b = dc.dropout_gap(ref_model, X, y, exact=True)
        assert (a.value, a.samples) == (b.value, b.samples)


@pytest.mark.parametrize("case", [mixed_case, head_case])
@pytest.mark.parametrize("center", ["clean", "midpoint"])
def test_analytic_dropout_objective_sites_equal_q_zero(case, center):
    model, X, y = case()
    names = [s.name for s in dc.find_sites(model)]
    for keep in ([names[0]], names[1:]):
        ref_model = only(model, keep)
        kw = dict(center=center, implicit_weight=0.7, site_weights={keep[0]: 2.0})
        a = dc.analytic_dropout_objective(model, X, y, sites=keep, generator=gen(11), **kw)
        b = dc.analytic_dropout_objective(ref_model, X, y, generator=gen(11), **kw)
        same(tuple(a), tuple(b))
        same(grads_of(model, a.objective), grads_of(ref_model, b.objective))


def test_an_occurrence_key_selects_one_call_of_a_module():
    model, X, y = mixed_case()
    full = dc.explicit_regularizer(model, X, y, per_site=True)
    one = dc.explicit_regularizer(model, X, y, per_site=True, sites=["drop#1"])
    assert list(one) == ["drop#1"]
    torch.testing.assert_close(one["drop#1"], full["drop#1"], rtol=1e-14, atol=0)
    both = dc.explicit_regularizer(model, X, y, per_site=True, sites="drop")
    assert list(both) == ["drop", "drop#1"]


def test_site_specs_and_analytic_mode_select_too():
    model, X, y = mixed_case()
    spec = [s for s in dc.find_sites(model) if s.name == "dc"]
    same(dc.explicit_regularizer(model, X, y, sites=spec), dc.explicit_regularizer(model, X, y, sites=["dc"]))
    with dc.analytic_mode(model, dc.zero_probe, sites=["drop_in", "drop#1"]) as s:
        model(X)
    assert [o.key for o in s.occurrences] == ["drop_in", "drop#1"]
    # the model is left as it was
    assert model.drop.p == 0.2 and model.dc.p == 0.25 and model.drop_in.p == 0.3


# ---------------------------------------------------------------------------
# per-site generators


def test_one_generator_for_every_site_is_the_plain_generator():
    model, X, y = mixed_case()
    g = gen(12)
    a = dc.implicit_noise(model, X, y, generator={n: g for n in SITES})
    b = dc.implicit_noise(model, X, y, generator=gen(12))
    same(a, b)
    g = gen(13)
    same(dc.explicit_regularizer(model, X, y, estimator="sampled", generator={n: g for n in SITES}),
         dc.explicit_regularizer(model, X, y, estimator="sampled", generator=gen(13)))


def test_per_site_generators_draw_what_separate_generators_draw():
    model, X, y = mixed_case()
    seeds = {"drop_in": 21, "drop": 22, "dc": 23}
    # the η each site receives is the one its own generator gives alone
    etas = {}
    with dc.analytic_mode(model, dc.noise_policy({n: gen(s) for n, s in seeds.items()})) as sess:
        model(X)
    for o in sess.occurrences:
        etas[o.key] = o.extra["eta"]
    for name, seed in seeds.items():
        with dc.analytic_mode(model, dc.noise_policy(gen(seed)), sites=[name]) as sess:
            model(X)
        for o in sess.occurrences:
            same(o.extra["eta"], etas[o.key])
    # Hutchinson per site: each site's value is that of a call with the site alone
    per = dc.explicit_regularizer(model, X, y, estimator="hutchinson", per_site=True, generator=dict(seeds))
    for name, seed in seeds.items():
        alone = dc.explicit_regularizer(model, X, y, estimator="hutchinson", per_site=True, sites=[name],
                                        generator=seed)
        for k, v in alone.items():
            same(v, per[k])
    # ξ_approx is linear in η: the sum of the sites' separate calls
    xi = dc.implicit_noise(model, X, y, generator=dict(seeds))
    parts = [dc.implicit_noise(model, X, y, sites=[n], generator=s) for n, s in seeds.items()]
    for k in xi:
        torch.testing.assert_close(xi[k], sum(p[k] for p in parts), rtol=1e-12, atol=1e-14)
    # a key before the module's name: drop#1 from its own stream
    m2 = {"drop_in": gen(21), "drop": gen(22), "drop#1": gen(24), "dc": gen(23)}
    with dc.analytic_mode(model, dc.noise_policy(m2)) as sess:
        model(X)
    got = {o.key: o.extra["eta"] for o in sess.occurrences}
    with dc.analytic_mode(model, dc.noise_policy(gen(24)), sites=["drop#1"]) as sess:
        model(X)
    same(sess.occurrences[0].extra["eta"], got["drop#1"])


def test_per_site_generators_in_the_shared_probe_objective():
    model, X, y = mixed_case()
    g = gen(1)
    same(tuple(dc.analytic_dropout_objective(model, X, y, generator={n: g for n in SITES})),
         tuple(dc.analytic_dropout_objective(model, X, y, generator=gen(1))))
    # dc's probe from a stream of its own: the other sites' probes keep the draws of the one stream
    g1 = gen(1)
    a = dc.analytic_dropout_objective(model, X, y, generator={"drop_in": g1, "drop": g1, "dc": gen(2)})
    b = dc.analytic_dropout_objective(model, X, y, generator=gen(1))
    assert not torch.equal(a.explicit, b.explicit)
    g1 = gen(1)
    same(tuple(a), tuple(dc.analytic_dropout_objective(model, X, y, generator={"drop_in": g1, "drop": g1, "dc": 2})))


# ---------------------------------------------------------------------------
# errors


def test_unknown_site_names_are_clear_errors():
    model, X, y = mixed_case()
    with pytest.raises(DropcheckError, match=r"sites names unknown site\(s\) \['nope'\]"):
        dc.explicit_regularizer(model, X, y, sites=["drop", "nope"])
    with pytest.raises(DropcheckError, match=r"unknown site\(s\) \['drop#2'\]"):
        dc.implicit_noise(model, X, y, sites=["drop#2"], generator=0)
    with pytest.raises(DropcheckError, match="sites names unknown"):
        dc.dropout_gap(model, X, y, sites=["lin"], samples=4, generator=0)
    with pytest.raises(DropcheckError, match="sites names unknown"):
        dc.analytic_dropout_objective(model, X, y, sites=["decoder"], generator=0)
    with pytest.raises(DropcheckError, match="sites names unknown"):
        with dc.analytic_mode(model, None, sites=["nope"]):
            model(X)
    with pytest.raises(DropcheckError, match="expected site names"):
        dc.explicit_regularizer(model, X, y, sites=[3])
    with pytest.raises(dc.NoDropoutSiteError):
        dc.explicit_regularizer(model, X, y, sites=[])


def test_generator_mapping_errors():
    model, X, y = mixed_case()
    with pytest.raises(DropcheckError, match=r"generator names unknown site\(s\) \['nope'\]"):
        dc.implicit_noise(model, X, y, generator={"drop_in": 1, "drop": 2, "dc": 3, "nope": 4})
    with pytest.raises(DropcheckError, match="no generator for site 'dc'"):
        dc.implicit_noise(model, X, y, generator={"drop_in": 1, "drop": 2})
    with pytest.raises(DropcheckError, match="needs one generator"):
        dc.explicit_regularizer(model, X, y, estimator="sampled", generator={"drop_in": 1, "drop": 2, "dc": 3})
    # a mapping that names only the sites taking part is enough
    dc.implicit_noise(model, X, y, sites=["dc"], generator={"dc": 3})
    R = dc.explicit_regularizer(model, X, y, estimator="fd", sites=["dc"], generator={"dc": 3})
    assert math.isfinite(float(R.detach()))
