"""The model factory behind `dropcheck taylor-map --model training.pipeline.factories:smoke_lm`."""

import torch

import dropcheck as dc
from training.pipeline.factories import smoke_lm


def test_smoke_lm_factory_gives_a_checkable_case(data_root, monkeypatch):
    monkeypatch.setenv("DROPCHECK_DATA", str(data_root))
    model, X, Y = smoke_lm(steps=3, batch=2, seq_len=4)
    logits = model(X)
    assert logits.shape == (4, 2, 10000) and logits.dtype == torch.float64
    keys = {s.name for s in dc.find_sites(model)}
    assert {"lm.drop_emb", "lm.drop_out"} <= keys
    r = dc.explicit_regularizer(model, X, Y, estimator="hutchinson", generator=0)
    assert torch.isfinite(r) and float(r.detach()) > 0


def test_study_lm_loads_a_runs_best_checkpoint_with_its_logged_config(data_root, monkeypatch, tmp_path):
    import pytest

    from dropcheck import DropcheckError
    from training.pipeline.configs import make_config
    from training.pipeline.factories import study_lm
    from training.pipeline.trainer import train

    monkeypatch.setenv("DROPCHECK_DATA", str(data_root))
    cfg = make_config("smoke", emb=6, hidden=8, max_steps=2, eval_every=2, progress=False, run_name="tiny-run-s1")
    res = train(cfg, data=str(data_root), out=tmp_path, config_name="smoke")
    model, X, Y = study_lm("tiny-run-s1", runs_dir=tmp_path, batch=2, seq_len=4)
    best = torch.load(res.best_path, weights_only=False)["model"]
    got = model.lm.state_dict()
    assert set(got) == set(best) and all(torch.equal(got[k].float(), best[k].float()) for k in best)
    assert model(X).shape == (4, 2, 10000) and model(X).dtype == torch.float64
    with pytest.raises(DropcheckError, match="no log or no best checkpoint of 'nope'"):
        study_lm("nope", runs_dir=tmp_path)
