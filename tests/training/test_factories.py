"""The model factory behind `dropcheck taylor-map --model training.factories:smoke_lm`."""

import torch

import dropcheck as dc
from training.factories import smoke_lm


def test_smoke_lm_factory_gives_a_checkable_case(data_root, monkeypatch):
    monkeypatch.setenv("DROPCHECK_DATA", str(data_root))
    model, X, Y = smoke_lm(steps=3, batch=2, seq_len=4)
    logits = model(X)
    assert logits.shape == (4, 2, 10000) and logits.dtype == torch.float64
    keys = {s.name for s in dc.find_sites(model)}
    assert {"lm.drop_emb", "lm.drop_out"} <= keys
    r = dc.explicit_regularizer(model, X, Y, estimator="hutchinson", generator=0)
    assert torch.isfinite(r) and float(r.detach()) > 0
