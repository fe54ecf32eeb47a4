"""Data parallelism: 2 gloo processes give the update of 1 process on the
concatenated batch (deterministic rules), and the replicas stay identical."""

from __future__ import annotations

import pytest
import torch

from training.pipeline.trainer import spawn_train, train


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_concatenated_batch(tiny_cfg, tiny_corpus, tiny_corpus_dir, tmp_path):
    cases = {
        # deterministic: must match one process up to floating-point order
        "none": tiny_cfg(rule="none", dtype="float64", max_steps=3, eval_every=0),
        "explicit": tiny_cfg(rule="explicit", estimator="exact", dtype="float64", max_steps=2, eval_every=0,
                             bptt=3, variable_bptt=False, q_rows=0.0),
        # stochastic (masks, ξ_approx): replicas must stay identical
        "dropout_implicit": tiny_cfg(rule="dropout_implicit", k=2, dtype="float64", max_steps=3, eval_every=0),
        # GPT-2 (functional attention dropout among the sites): the same two properties
        "gpt2-explicit": tiny_cfg(arch="gpt2", rule="explicit", estimator="exact", dtype="float64", max_steps=2,
                                  eval_every=0, bptt=3),
        "gpt2-dropout_implicit": tiny_cfg(arch="gpt2", rule="dropout_implicit", k=2, dtype="float64", max_steps=3,
                                          eval_every=0),
    }
    jobs = [(cfg, {"out": str(tmp_path / f"ddp-{n}"), "dump": str(tmp_path / f"dump-{n}")}) for n, cfg in cases.items()]
    spawn_train(2, jobs, corpus_dir=str(tiny_corpus_dir))
    for name, cfg in cases.items():
        r0 = torch.load(tmp_path / f"dump-{name}" / "rank0.pt")
        r1 = torch.load(tmp_path / f"dump-{name}" / "rank1.pt")
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (name, k)
        if name.endswith("dropout_implicit"):
            continue
        one = train(cfg, out=tmp_path / f"one-{name}", corpus=tiny_corpus)
        for k, v in one.last_state.items():
            torch.testing.assert_close(r0[k], v, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} {k}: {m}")
        # the comparison is not vacuous: training moved the parameters
        init = train(cfg, out=tmp_path / f"init-{name}", corpus=tiny_corpus, stop_after=0)
        assert any(not torch.allclose(init.last_state[k], one.last_state[k]) for k in one.last_state)
