"""The GPT-2 entry (arch=gpt2): its sites come from the core, every rule
trains on it, and the rule's R̂ is unbiased for the core's exact R_approx with
attention dropout on."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dropcheck as dc
from dropcheck import DropcheckError
from training.pipeline.configs import make_config
from training.pipeline.lm import StatefulLM
from training.pipeline.rules import Gens, make_rule, site_table
from training.pipeline.trainer import build_lm

V = 20


def _model(cfg, seed=0, scale=None):
    """The tiny GPT-2; ``scale``: every parameter redrawn N(0, scale²) (at
    Hugging Face's initialisation, std 0.02, attention is nearly uniform and
    its dropout all but invisible in R_approx)."""
    lm = build_lm(cfg, V, torch.device("cpu"), torch.float64)
    if scale is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lm.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return StatefulLM(lm)


def _batch(T=6, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)


def test_sites_q_and_groups_come_from_the_core(tiny_cfg):
    cfg = tiny_cfg(arch="gpt2", dtype="float64")
    model = _model(cfg)
    table = site_table(model, "gpt2")
    groups = {n: g for n, (_s, g) in table.items()}
    q = {n: s.q for n, (s, _g) in table.items()}
    # one embedding site, per layer one functional attention site and two residual modules, the head's site
    assert sorted(groups.values()) == sorted(["embedding", "output"]
                                             + ["attention", "residual", "residual"] * cfg["layers"])
    for n, (s, g) in table.items():
        assert q[n] == {"embedding": 0.3, "attention": 0.2, "residual": 0.25, "output": 0.15}[g], n
        assert s.functional == (g == "attention"), n
        assert s.structure == "position"
    # the same sites the core lists for a forward pass
    x, _ = _batch()
    assert {s.name for s in dc.find_sites(model, x)} == set(table)


def test_without_head_dropout_the_model_is_hugging_faces_alone(tiny_cfg):
    """q_head = 0 adds no site and no module: the logits are GPT2LMHeadModel's own."""
    cfg = tiny_cfg(arch="gpt2", dtype="float64", q_head=0.0)
    model = _model(cfg, scale=0.7).eval()
    assert "output" not in {g for _s, g in site_table(model, "gpt2").values()}
    x, _ = _batch()
    with torch.no_grad():
        ours = model(x)
        theirs = model.lm.hf(input_ids=x.t()).logits.transpose(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)  # the same sums, up to their order


def test_the_exact_rule_is_the_cores_exact_regularizer_split_by_group(tiny_cfg):
    cfg = tiny_cfg(arch="gpt2", dtype="float64", rule="explicit", estimator="exact", explicit_mult_attention=3.0)
    model = _model(cfg, scale=0.7)
    rule = make_rule(cfg, model)
    x, y = _batch()
    g = torch.Generator().manual_seed(3)
    res = rule.objective(model, x, y, Gens(g, g))
    per = dc.explicit_regularizer(model, x, y, estimator="exact", weighted=True, per_site=True)
    by_group: dict = {}
    for key, v in per.items():
        grp = rule.groups[key.split("#", 1)[0]]
        by_group[grp] = by_group.get(grp, 0.0) + v.item() * (3.0 if grp == "attention" else 1.0)
    assert set(by_group) == {"embedding", "attention", "residual", "output"}
    for grp, v in by_group.items():
        assert res.reg[f"R/{grp}"].item() == pytest.approx(v, rel=1e-12), grp
    assert res.reg["R"].item() == pytest.approx(sum(by_group.values()), rel=1e-12)
    assert by_group["attention"] > 0  # attention dropout contributes


@pytest.mark.parametrize("estimator", [
    "fd_shared",  # the study's route, always on
    *(pytest.param(e, marks=pytest.mark.heavy) for e in ("fd_mid", "fd", "hutchinson", "sampled")),
])
def test_the_rules_estimate_is_unbiased_for_the_exact_regularizer(tiny_cfg, estimator):
    """Mean of the rule's R̂ over 200 probes against dc.explicit_regularizer
    (estimator="exact", λ = q/(2(1-q)) per site), attention dropout on (about
    a tenth of R here), within 4 standard errors.  A wrong λ fails: with
    explicit_mult=2 (what λ = q/(1-q) would give) z was 28.8 at 300 probes for
    fd_shared, fd_mid and fd alike."""
    cfg = tiny_cfg(arch="gpt2", dtype="float64", rule="explicit", estimator=estimator)
    model = _model(cfg, scale=0.7)
    rule = make_rule(cfg, model)
    x, y = _batch()
    exact = dc.explicit_regularizer(model, x, y, estimator="exact").item()
    attention = sum(v.item() for k, v in dc.explicit_regularizer(model, x, y, estimator="exact", per_site=True).items()
                    if rule.groups[k.split("#", 1)[0]] == "attention")
    assert attention > 0.05 * exact  # the attention sites are a visible part of R
    g = torch.Generator().manual_seed(11)
    gens = Gens(g, g)
    vals = torch.tensor([rule.objective(model, x, y, gens).reg["R"].item() for _ in range(200)])
    mean, se = vals.mean().item(), vals.std().item() / math.sqrt(len(vals))
    assert se > 0
    z = (mean - exact) / se
    assert abs(z) < 4, f"{estimator}: mean {mean:.6g} vs exact {exact:.6g}, se {se:.3g}, z {z:.2f}"


RULES = [
    dict(rule="none"),
    dict(rule="l2"),
    dict(rule="dropout", k=2),
    dict(rule="dropout_inject", k=2),
    dict(rule="dropout_implicit", k=2, noise_estimator="fd"),
    dict(rule="dropout_implicit", k=2, estimator="fd_shared"),
    dict(rule="explicit", estimator="fd_shared"),
    dict(rule="explicit", estimator="fd_mid"),
    dict(rule="explicit_implicit", estimator="fd_shared"),
    dict(rule="explicit_implicit", estimator="fd_mid"),
    dict(rule="identity_hessian", estimator="fd_shared"),
    dict(rule="loss_jacobian"),
]


@pytest.mark.parametrize("over", RULES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_rule_trains_gpt2_from_the_cli(tiny_corpus_dir, tmp_path, over):
    from dropcheck.cli import main

    args = ["train", "-c", "smoke-gpt2", "--data", str(tiny_corpus_dir), "--out", str(tmp_path), "--no-progress",
            "emb=8", "heads=2", "bptt=6", "batch_size=4", "eval_batch_size=2", "test_batch_size=2",
            "train_tokens=0", "valid_tokens=0", "test_tokens=0", "max_steps=3", "eval_every=3",
            "train_eval_tokens=0", "run_name=r", *(f"{k}={v}" for k, v in over.items())]
    assert main(args) in (0, None)
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert recs[0]["arch"] == "gpt2" and recs[0]["config"]["rule"] == over["rule"]
    assert recs[-1]["type"] == "final" and math.isfinite(recs[-1]["test_ppl"])


@pytest.mark.parametrize("over, match", [
    (dict(tie=False), "arch 'gpt2' refuses this config .*tie"),
    (dict(rule="explicit_implicit", noise_structure="positions"), "arch 'gpt2' refuses .*rule 'explicit_implicit'"),
    (dict(hidden=64), "'hidden': is read by arch 'awd-lstm' only"),
])
def test_configs_gpt2_cannot_run_are_refused_when_read(over, match):
    with pytest.raises(DropcheckError, match=match):
        make_config("smoke-gpt2", **over)


def test_the_lstm_refuses_gpt2_keys():
    with pytest.raises(DropcheckError, match="'q_attention': is read by arch 'gpt2' only"):
        make_config("smoke", q_attention=0.1)


def test_the_clean_pass_has_every_site_off(tiny_cfg):
    """Rule none's loss is the dropout-free loss (eval mode), draws nothing from
    torch's RNG, and the model is left in training mode: attention dropout, a
    functional call whose p follows the attention module's mode, is off too."""
    cfg = tiny_cfg(arch="gpt2", dtype="float64", rule="none")
    model = _model(cfg, scale=0.7).train()
    rule = make_rule(cfg, model)
    x, y = _batch()
    g = torch.Generator().manual_seed(3)
    before = torch.get_rng_state()
    loss = rule.objective(model, x, y, Gens(g, g)).loss
    assert torch.equal(torch.get_rng_state(), before)
    assert all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
