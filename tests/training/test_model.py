"""The AWD-LSTM model: backends agree, every dropout is an analytic site."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dropcheck as dc
from dropcheck import DropcheckError
from training.models.awd_lstm import AWDLSTM, EmbeddingRowDropout, LSTMLayer, StatefulLM, site_groups

V = 13


def _lm(backend="loop", seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(q_embedding=0.3, q_hidden=0.2, q_output=0.4, q_weights=0.25, q_rows=0.1)
    args.update(kw)
    return AWDLSTM(V, 5, 6, 3, backend=backend, **args).double()


def _hidden(lm, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (0.3 * torch.randn(B, r.n_out, generator=g, dtype=torch.float64),
         0.3 * torch.randn(B, r.n_out, generator=g, dtype=torch.float64))
        for r in lm.rnns
    ]


@given(T=st.integers(1, 7), B=st.integers(1, 4), train=st.booleans())
def test_loop_and_fused_agree_outputs_and_gradients_float64(T, B, train):
    loop, fused = _lm("loop"), _lm("fused")
    fused.load_state_dict(loop.state_dict())
    x = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(T * 10 + B))
    outs = []
    for lm in (loop, fused):
        lm.train(train)
        torch.manual_seed(123)  # the sites' own dropout: same masks for both
        logits, hid = lm(x, _hidden(lm, B))
        loss = logits.pow(2).mean() + sum(h.pow(2).sum() + c.sum() for h, c in hid)
        grads = torch.autograd.grad(loss, list(lm.parameters()))
        outs.append((logits, hid, grads))
    (l1, h1, g1), (l2, h2, g2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for (a, b), (c, d) in zip(h1, h2):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, d, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lstm_layer_matches_torch_lstm():
    torch.manual_seed(0)
    layer = LSTMLayer(4, 5).double()
    ref = torch.nn.LSTM(4, 5).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.w_ih)
        ref.weight_hh_l0.copy_(layer.w_hh)
        ref.bias_ih_l0.copy_(layer.b_ih)
        ref.bias_hh_l0.copy_(layer.b_hh)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    h0, c0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    out, (h, c) = layer(x, (h0, c0), "loop")
    rout, (rh, rc) = ref(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(h, rh[0])
    torch.testing.assert_close(c, rc[0])


def test_loop_backend_supports_double_backward():
    lm = _lm("loop")
    x = torch.randint(0, V, (4, 2))
    logits, _ = lm(x)
    (g,) = torch.autograd.grad(logits.pow(2).sum(), lm.rnns[0].w_hh, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), lm.rnns[1].w_ih)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_sites_and_groups():
    lm = _lm()
    model = StatefulLM(lm)
    sites = {s.name: s for s in dc.find_sites(model)}
    groups = site_groups(model)
    assert groups == {
        "lm.drop_rows": "rows",
        "lm.drop_emb": "embedding",
        "lm.rnns.0.wdrop": "weights",
        "lm.rnns.1.wdrop": "weights",
        "lm.rnns.2.wdrop": "weights",
        "lm.drop_hidden.0": "hidden",
        "lm.drop_hidden.1": "hidden",
        "lm.drop_out": "output",
    }
    assert set(sites) == set(groups)
    assert sites["lm.drop_emb"].structure == "locked"
    assert sites["lm.rnns.1.wdrop"].structure == "weight"
    assert sites["lm.drop_rows"].structure == "weight"
    w = lm.encoder.weight
    assert sites["lm.drop_rows"].mask_shape(w) == (V, 1)
    assert sites["lm.drop_emb"].mask_shape(torch.zeros(7, 2, 5)) == (1, 2, 5)
    # a site with q = 0 is not a site for dropcheck but keeps its group
    lm0 = _lm(q_rows=0.0)
    assert "lm.drop_rows" not in {s.name for s in dc.find_sites(StatefulLM(lm0))}


def test_tied_weights_and_shapes():
    lm = _lm()
    assert lm.decoder.weight is lm.encoder.weight
    names = [n for n, _ in lm.named_parameters()]
    assert names.count("encoder.weight") == 1 and "decoder.weight" not in names
    logits, hid = lm(torch.randint(0, V, (7, 3)))
    assert logits.shape == (7, 3, V)
    assert [h.shape for h, _ in hid] == [(3, 6), (3, 6), (3, 5)]
    with pytest.raises(DropcheckError, match="tokens must have shape"):
        lm(torch.zeros(3, dtype=torch.long))
    with pytest.raises(DropcheckError, match="unknown LSTM backend"):
        AWDLSTM(V, 4, 4, 1, backend="cudnn")


def test_embedding_row_dropout_drops_whole_rows():
    torch.manual_seed(0)
    d = EmbeddingRowDropout(0.5)
    w = torch.ones(50, 4)
    out = d(w)
    rows = out[:, 0]
    assert set(rows.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(out, rows[:, None].expand(50, 4))
    d.eval()
    assert d(w) is w
    # through the model: the embedding lookup uses dropped rows, the decoder the clean weight
    lm = AWDLSTM(V, 4, 4, 1, q_embedding=0, q_hidden=0, q_output=0, q_weights=0, q_rows=0.99)
    torch.manual_seed(1)
    lm.train()
    logits, _ = lm(torch.arange(V)[:, None])
    assert logits.abs().sum() > 0  # decoder bias is 0: nonzero logits need the clean tied weight


def test_stateful_wrapper_keeps_its_hidden_state():
    lm = _lm()
    model = StatefulLM(lm).eval()
    x = torch.randint(0, V, (5, 2))
    h = _hidden(lm, 2)
    model.hidden = h
    a = model(x)
    b = model(x)
    assert model.hidden is h
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, lm(x, h)[0])
    assert not torch.allclose(a, lm(x, None)[0])


def test_dropcheck_noise_structure_on_the_model():
    """Analytic mode with dropout noise: locked sites share η over time, the
    row site drops whole embedding rows (checked through the recorded η)."""
    lm = _lm()
    model = StatefulLM(lm)
    seen = {}

    def policy(occ):
        eta = torch.where(torch.rand(occ.mask_shape, dtype=occ.h.dtype) < occ.site.q, -1.0, occ.site.q / (1 - occ.site.q))
        seen[occ.key] = (occ.h.shape, eta.shape)
        return occ.expand(eta) * occ.h

    with dc.analytic_mode(model, policy):
        model(torch.randint(0, V, (4, 3)))
    assert seen["lm.drop_rows"] == ((V, 5), (V, 1))
    assert seen["lm.drop_emb"] == ((4, 3, 5), (1, 3, 5))
    assert seen["lm.rnns.2.wdrop"] == ((20, 5), (20, 5))
    assert seen["lm.drop_out"] == ((4, 3, 5), (1, 3, 5))
