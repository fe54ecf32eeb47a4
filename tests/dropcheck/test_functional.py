"""Functional and attention dropout, train/eval, refusals, outputs and targets.

Routes compared: a functional call (``F.dropout``, ``torch.dropout``,
``F.dropout2d``, ``scaled_dot_product_attention``) against the same network
written with dropout *modules* (a different mechanism in dropcheck: forward
hooks instead of the torch-function mode); the analytic attention formula
against torch's own SDPA kernel; ``nn.MultiheadAttention``'s two internal
paths (``need_weights=True``: ``F.dropout`` on the weights; ``False``:
SDPA) against each other; an ``ignore_index`` batch against the same batch
with those rows removed; brute-force float64 references of dc_references.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dc_cases as cases
import dc_references as refs
import dropcheck as dc
import dropcheck.testing as dct
import model_zoo as Z

DT = torch.float64


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _flat(g: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in g.values()])


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


class TwoLayer(nn.Module):
    """``x -> drop(x) -> tanh(W1 ·) -> drop2d-or-drop -> W2 -> logits``, with
    the drops as modules (``functional=False``) or as function calls."""

    def __init__(self, functional: str, q1=0.3, q2=0.4, channel=False):
        super().__init__()
        self.functional, self.q1, self.q2, self.channel = functional, q1, q2, channel
        self.l1 = nn.Conv1d(2, 3, 1) if channel else nn.Linear(3, 4)
        self.l2 = nn.Conv1d(3, 3, 1) if channel else nn.Linear(4, 3)
        if functional == "module":
            self.d1 = nn.Dropout(q1)
            self.d2 = nn.Dropout1d(q2) if channel else nn.Dropout(q2)

    def forward(self, x):
        if self.functional == "module":
            a, b = self.d1, self.d2
        elif self.functional == "F":
            a = lambda t: F.dropout(t, self.q1, self.training)  # noqa: E731
            b = (lambda t: F.dropout1d(t, self.q2, self.training)) if self.channel else \
                (lambda t: F.dropout(t, p=self.q2, training=self.training))
        else:  # torch.dropout / torch.feature_dropout
            a = lambda t: torch.dropout(t, self.q1, self.training)  # noqa: E731
            b = (lambda t: torch.feature_dropout(t, self.q2, self.training)) if self.channel else \
                (lambda t: torch.dropout(t, self.q2, self.training))
        z = self.l2(b(torch.tanh(self.l1(a(x)))))
        return z.transpose(1, 2) if self.channel else z


@pytest.mark.parametrize("kind", ["F", "torch"])
@pytest.mark.parametrize("channel", [False, True])
def test_functional_dropout_equals_module_dropout(kind, channel):
    mods = _seeded(TwoLayer("module", channel=channel).double(), 0)
    fun = TwoLayer(kind, channel=channel).double()
    fun.load_state_dict(mods.state_dict())
    if channel:
        X = torch.randn(2, 2, 2, generator=cases.gen(1), dtype=DT)  # 2·2 + 3 = 7 units per example
        y = torch.randint(0, 3, (2, 2), generator=cases.gen(2))
    else:
        X, y = cases.data(3, 3, 3, seed=1)  # 3 + 4 = 7 units per example
    sites = dc.find_sites(fun, X)
    # named by the attribute that holds q (read from the call's source: self.q1, self.q2)
    assert [(s.name, s.q) for s in sites] == [("<root>:q1", 0.3), ("<root>:q2", 0.4)]
    for m in (mods, fun):
        m.train()
    vals = {}
    for name, m in (("module", mods), ("functional", fun)):
        vals[name] = {
            "exact": _f(dc.explicit_regularizer(m, X, y)),
            "taylor": _f(dc.taylor_regularizer(m, X, y)),
            "gap": dc.dropout_gap(m, X, y, exact=True).value,
            "xi": _flat(dc.implicit_noise(m, X, y, generator=3)),
        }
    for k in vals["module"]:
        a, b = vals["module"][k], vals["functional"][k]
        if isinstance(a, torch.Tensor):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), k
        else:
            assert a == pytest.approx(b, rel=1e-12), k
    # and against the brute-force reference (module form, dc_references' own wiring)
    bf = sum(refs.bf_explicit(mods, X, y).values())
    assert vals["functional"]["exact"] == pytest.approx(float(bf), rel=1e-10)
    # the test's own joint enumeration, example by example (equal row counts per example)
    own = sum(refs.bf_gap_enum(mods, X[i : i + 1], y[i : i + 1]) for i in range(X.shape[0])) / X.shape[0]
    assert vals["functional"]["gap"] == pytest.approx(own, rel=1e-10)


def test_functional_site_keys_name_the_calling_module():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return F.dropout(self.lin(F.dropout(x, 0.2)), 0.3)

    model = nn.Sequential(Inner(), nn.Tanh(), Inner(), nn.Linear(3, 2)).double()
    X, _ = cases.data(2, 3, 2, seed=0)
    sites = dc.find_sites(model, X)
    # literal q: no attribute holds it, so the name carries it (unique, independent of call order)
    assert [(s.name, s.q, s.functional) for s in sites] == [
        ("0:dropout@0.2", 0.2, True), ("0:dropout@0.3", 0.3, True), ("2:dropout@0.2", 0.2, True),
        ("2:dropout@0.3", 0.3, True)]
    y = torch.randint(0, 2, (2,))
    keys = list(dc.explicit_regularizer(model, X, y, per_site=True))
    assert keys == ["0:dropout@0.2", "0:dropout@0.3", "2:dropout@0.2", "2:dropout@0.3"]
    with pytest.raises(dc.NoDropoutSiteError):
        dc.find_sites(model)  # no dropout *module*: only a forward pass shows them


# -- attention ----------------------------------------------------------------


class Attn(nn.Module):
    """Single-head self-attention; ``how``: ``"sdpa"`` (F.scaled_dot_product_attention
    with ``dropout_p``) or ``"manual"`` (softmax, an ``nn.Dropout`` module on
    the probabilities, matmul)."""

    def __init__(self, how, d=4, c=3, p=0.3, causal=False, heads=2, kv_heads=2):
        super().__init__()
        self.how, self.p, self.causal, self.heads, self.kv_heads = how, p, causal, heads, kv_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d // heads * kv_heads)
        self.v = nn.Linear(d, d // heads * kv_heads)
        self.o = nn.Linear(d, c)
        self.drop = nn.Dropout(p)
        self.mask = None

    def split(self, t, n):
        B, T, _ = t.shape
        return t.reshape(B, T, n, -1).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x), self.heads), self.split(self.k(x), self.kv_heads), self.split(self.v(x), self.kv_heads)
        if self.how == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal,
                                               dropout_p=self.p if self.training else 0.0,
                                               enable_gqa=self.kv_heads != self.heads)
        else:
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, 1)
                v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            T = x.shape[1]
            if self.causal:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            if self.mask is not None:
                s = s.masked_fill(~self.mask, float("-inf")) if self.mask.dtype == torch.bool else s + self.mask
            a = self.drop(torch.softmax(s, -1)) @ v
        B, H, T, E = a.shape
        return self.o(a.transpose(1, 2).reshape(B, T, H * E))


MASKS = ["none", "causal", "bool", "float", "gqa"]


def _attn_pair(mask: str, seed=0):
    kw = dict(causal=mask == "causal", kv_heads=1 if mask == "gqa" else 2)
    sd, man = Attn("sdpa", **kw).double(), Attn("manual", **kw).double()
    _seeded(sd, seed)
    man.load_state_dict(sd.state_dict())
    X = torch.randn(2, 3, 4, generator=cases.gen(seed + 1), dtype=DT)
    y = torch.randint(0, 3, (2, 3), generator=cases.gen(seed + 2))
    if mask == "bool":
        m = torch.ones(2, 1, 3, 3, dtype=torch.bool)
        m[1, :, :, 2] = False  # example 1 cannot attend to its last position
        sd.mask = man.mask = m
    if mask == "float":
        f = torch.randn(1, 2, 3, 3, generator=cases.gen(seed + 3), dtype=DT)
        sd.mask = man.mask = f
    return sd, man, X, y


@pytest.mark.parametrize("mask", MASKS)
def test_attention_math_path_equals_torchs_kernel(mask):
    sd, man, X, y = _attn_pair(mask)
    sd.eval()
    with torch.no_grad():
        ref = sd(X)  # torch's SDPA kernel, no dropout
        with dc.analytic_mode(sd) as s:
            ours = dc._common.call_model(sd, X)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-13)
    assert [o.key for o in s.occurrences] == ["<root>:p"]  # the attribute holding q


@pytest.mark.parametrize("mask", MASKS)
def test_sdpa_attention_dropout_equals_dropout_on_the_probabilities(mask):
    """SDPA's ``dropout_p`` drops attention probabilities: every quantity equals
    that of the same network with an ``nn.Dropout`` module on the softmax
    output; the double-backward routes (Hutchinson, Taylor, ξ autograd) run."""
    sd, man, X, y = _attn_pair(mask)
    for m in (sd, man):
        m.train()
    for fn in (lambda m: dc.explicit_regularizer(m, X, y),
               lambda m: dc.explicit_regularizer(m, X, y, estimator="hutchinson", generator=0),
               lambda m: dc.taylor_regularizer(m, X, y)):
        assert _f(fn(sd)) == pytest.approx(_f(fn(man)), rel=1e-11)
    a, b = _flat(dc.implicit_noise(sd, X, y, generator=1)), _flat(dc.implicit_noise(man, X, y, generator=1))
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    ex = dc.explicit_regularizer(sd, X, y)
    bf = sum(refs.bf_explicit(man, X, y).values())
    assert _f(ex) == pytest.approx(float(bf), rel=1e-10)


def test_multihead_attention_both_paths_agree():
    """``nn.MultiheadAttention`` drops its weights with ``F.dropout`` when
    ``need_weights=True`` and through SDPA when ``False``: same site, same
    values, and dropcheck's Monte Carlo gap matches the module's own."""

    class M(nn.Module):
        def __init__(self, nw):
            super().__init__()
            self.nw = nw
            self.mha = nn.MultiheadAttention(4, 2, dropout=0.4, batch_first=True)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.mha(x, x, x, need_weights=self.nw)[0])

    a, b = _seeded(M(True).double(), 0), M(False).double()
    b.load_state_dict(a.state_dict())
    X = torch.randn(2, 3, 4, generator=cases.gen(1), dtype=DT)
    y = torch.randint(0, 3, (2, 3), generator=cases.gen(2))
    assert [s.name for s in dc.find_sites(a, X)] == ["mha:dropout"]  # MultiheadAttention.dropout holds q
    assert [s.name for s in dc.find_sites(b, X)] == ["mha:dropout"]
    assert _f(dc.explicit_regularizer(a, X, y)) == pytest.approx(_f(dc.explicit_regularizer(b, X, y)), rel=1e-11)
    assert _f(dc.taylor_regularizer(a, X, y)) == pytest.approx(_f(dc.taylor_regularizer(b, X, y)), rel=1e-11)
    dct.assert_gap_matches_own_dropout(a, X, y, 800, generator=3)  # own draws seed 3, dropcheck's seed 4


# -- train mode, refusals, buffers -----------------------------------------------


class Noisy(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if not self.training:
            return x
        if self.how == "randn":
            return x + 0.1 * torch.randn_like(x)
        if self.how == "uniform_":
            return x * torch.empty_like(x).uniform_(0.9, 1.1)
        if self.how == "alpha":
            return F.alpha_dropout(x, 0.2, True)
        if self.how == "rrelu":
            return F.rrelu(x, training=True)
        if self.how == "fractional":  # a random op dropcheck has no list entry for: the RNG check sees it
            return F.fractional_max_pool2d(x[:, None, None, :].expand(-1, 1, 2, -1), (1, 2),
                                           output_size=(2, x.shape[-1] - 1))[:, 0, 0, :].repeat_interleave(2, -1)[:, : x.shape[-1]]
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["randn", "uniform_", "alpha", "rrelu", "fractional"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unknown_randomness_is_refused_naming_the_module(how, mode):
    model = nn.Sequential(nn.Linear(3, 4), Noisy(how), nn.Dropout(0.3), nn.Linear(4, 3)).double()
    model.train(mode == "train")
    X, y = cases.data(2, 3, 3, seed=0)
    for call in (lambda: dc.explicit_regularizer(model, X, y, estimator="fd", generator=0),
                 lambda: dc.explicit_regularizer(model, X, y)):
        with pytest.raises(dc.DropcheckError, match="random") as e:
            call()
        if how != "fractional":
            assert "'1' (Noisy)" in str(e.value)
    assert model.training == (mode == "train")


def test_randomness_after_the_first_call_is_caught():
    """The torch-function mode runs on a model's first analytic context and
    then only if it had work; the RNG-state check of every pass covers the
    later ones."""
    noisy = Noisy("randn")
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), noisy, nn.Linear(4, 3)).double()
    X, y = cases.data(2, 3, 3, seed=0)
    noisy.how = "none"
    noisy.forward = lambda x: x  # no randomness at first
    dc.explicit_regularizer(model, X, y)
    from dropcheck._analytic import _DISCOVERED

    assert _DISCOVERED[model][1] is False  # no functional work: later passes skip the mode
    del noisy.forward
    noisy.how = "randn"
    with pytest.raises(dc.DropcheckError, match=r"'2' \(Noisy\) draws random numbers"):
        dc.explicit_regularizer(model, X, y)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.LSTM(3, 3, num_layers=2, dropout=0.2), "fused kernel"),
    (lambda: Z.DropPath(0.2, scale_by_keep=False), "scale_by_keep=False"),
    (lambda: Z.StochasticDepth(0.2, "pixel"), "mode 'pixel'"),
    (lambda: nn.AlphaDropout(0.2), "not multiplicative"),
])
def test_static_refusals(make, match):
    model = nn.Sequential(make(), nn.Dropout(0.1))
    with pytest.raises(dc.DropcheckError, match=match):
        dc.find_sites(model)


class EMA(nn.Module):
    """Updates a buffer in every training-mode forward pass."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("avg", torch.zeros(d, dtype=DT))

    def forward(self, x):
        if self.training:
            self.avg.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


def test_buffers_and_flags_are_restored_exactly():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), EMA(4), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    X, y = cases.data(5, 3, 3, seed=0)
    for mode in (True, False):
        model.train(mode)
        model[3].eval()  # a mixed state must come back as it was
        flags = [m.training for m in model.modules()]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        vals = [_f(dc.explicit_regularizer(model, X, y)), dc.dropout_gap(model, X, y, samples=5, generator=0).value,
                _f(dc.analytic_dropout_objective(model, X, y, generator=0).objective)]
        _flat(dc.implicit_noise(model, X, y, generator=0, estimator="fd"))
        assert [m.training for m in model.modules()] == flags
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        if mode:
            first = vals
        else:
            assert vals == pytest.approx(first, rel=1e-13)
    # the analytic network uses BatchNorm's running statistics (eval behaviour)
    model.eval()
    with dc.analytic_mode(model), torch.no_grad():
        z = dc._common.call_model(model, X)
    assert torch.allclose(z, model(X), rtol=0, atol=0)


# -- outputs, inputs, targets ------------------------------------------------------


def test_ignore_index_equals_dropping_the_rows():
    model = cases.mlp([3, 4, 3], ["tanh"], {0: 0.3, 1: 0.2}, seed=0)
    X, y = cases.data(6, 3, 3, seed=1)
    y_ign = y.clone()
    y_ign[[1, 4]] = -100
    keep = torch.tensor([0, 2, 3, 5])
    Xk, yk = X[keep], y[keep]
    pairs = [
        (lambda X, y: dc.explicit_regularizer(model, X, y), 1e-12),
        (lambda X, y: dc.taylor_regularizer(model, X, y), 1e-12),
        (lambda X, y: dc.loss_jacobian_regularizer(model, X, y), 1e-12),
        (lambda X, y: dc.first_order_gap(model, X, y), 1e-10),
    ]
    for fn, tol in pairs:
        assert _f(fn(X, y_ign)) == pytest.approx(_f(fn(Xk, yk)), rel=tol)
    # per-example dropout: the ignored rows' units do not change the kept rows' losses
    assert dc.dropout_gap(model, X[:3], y_ign[:3], exact=True).value == pytest.approx(
        dc.dropout_gap(model, X[[0, 2]], y[[0, 2]], exact=True).value, rel=1e-12)
    ci, ck = dc.implicit_noise_covariance(model, X, y_ign), dc.implicit_noise_covariance(model, Xk, yk)
    assert torch.allclose(ci, ck, rtol=1e-10, atol=1e-14)
    # the finite-difference routes select the same rows in their perturbed passes
    fd = sum(_f(v) for v in dc.explicit_regularizer(model, X, y_ign, estimator="fd", generator=0, eps=1e-5,
                                                     per_site=True).values())
    hu = _f(dc.explicit_regularizer(model, X, y_ign, estimator="hutchinson", generator=0))
    assert fd == pytest.approx(hu, rel=1e-6)
    xa = _flat(dc.implicit_noise(model, X, y_ign, generator=0))
    xb = _flat(dc.implicit_noise(model, X, y_ign, generator=0, estimator="fd", eps=1e-5))
    assert float((xa - xb).norm() / xa.norm()) < 1e-6
    obj = dc.analytic_dropout_objective(model, X, y_ign, generator=0)
    with torch.no_grad():
        clean = float(F.cross_entropy(model.eval()(Xk), yk))
    assert _f(obj.loss) == pytest.approx(clean, rel=1e-12)


def test_dict_inputs_and_model_outputs():
    class DictModel(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.net = cases.mlp([3, 4, 3], ["tanh"], {1: 0.3}, seed=0)

        def forward(self, x, scale=None):
            z = self.net(x) * (1.0 if scale is None else scale)
            if self.kind == "dict":
                return {"loss": None, "logits": z}
            if self.kind == "attr":
                return type("Out", (), {"logits": z})()
            return (z, "hidden")

    X, y = cases.data(4, 3, 3, seed=0)
    ref = _f(dc.explicit_regularizer(DictModel("tuple").net, X, y))
    for kind in ("dict", "attr", "tuple"):
        m = DictModel(kind)
        assert _f(dc.explicit_regularizer(m, {"x": X, "scale": None}, y)) == pytest.approx(ref, rel=1e-13)


def test_dtype_mismatch_and_empty_batch_are_clear_errors():
    model = cases.mlp([3, 4, 3], ["tanh"], {0: 0.3}, seed=0)
    X, y = cases.data(4, 3, 3, seed=0)
    with pytest.raises(dc.DropcheckError, match=r"inputs have dtype torch.float32 but the model's parameters are torch.float64"):
        dc.explicit_regularizer(model, X.float(), y)
    with pytest.raises(dc.DropcheckError, match="empty batch"):
        dc.explicit_regularizer(model, X[:0], y[:0])
    with pytest.raises(dc.DropcheckError, match="every target is ignore_index"):
        dc.explicit_regularizer(model, X, torch.full_like(y, -100))
    with pytest.raises(dc.DropcheckError, match="or be ignore_index"):
        dc.explicit_regularizer(model, X, torch.full_like(y, -7))


# -- exact enumeration, factorized ------------------------------------------------


def test_enumeration_factorizes_over_examples_and_batches_masks():
    """A 12-example batch with one 5-unit dropout layer: 12 groups of 5 units,
    2^5 mask passes shared by all groups (plus one NaN-taint pass per unit and
    the clean pass), and the value equals the mean of the test's own
    per-example enumerations."""
    model = cases.mlp([4, 5, 3], ["tanh"], {1: 0.3}, seed=2, scale=2.0)
    X, y = cases.data(12, 4, 3, seed=3)
    calls = [0]
    handle = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        est = dc.dropout_gap(model, X, y, exact=True)
    finally:
        handle.remove()
    assert est.samples == 12 * 2**5
    assert calls[0] == 1 + 12 * 5 + 2**5
    ref = sum(refs.bf_gap_enum(model, X[i : i + 1], y[i : i + 1]) for i in range(12)) / 12
    assert est.value == pytest.approx(ref, rel=1e-11)


def test_enumeration_groups_locked_dropout_by_sequence():
    """Locked dropout shares one mask over time: a sequence's units form one
    group, sequences are independent (the test's own joint enumeration of the
    one-sequence batches as reference)."""
    model = cases.ElmanLocked(2, 3, 2, q_in=0.3, q_out=0.4, seed=0)
    X, y = cases.seq_data(3, 3, 2, 2, seed=1)  # (T, B, D): 3 sequences, 2 + 3 units each
    est = dc.dropout_gap(model, X, y, exact=True)
    assert est.samples == 3 * 2 ** (2 + 3)
    ref = sum(refs.bf_gap_enum(model, X[:, b : b + 1], y[:, b : b + 1]) for b in range(3)) / 3
    assert est.value == pytest.approx(ref, rel=1e-11)
