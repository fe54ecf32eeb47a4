"""training/studies/noise_scale.py: the rule-noise / batch-noise decomposition."""

import math

import pytest
import torch

from dropcheck import DropcheckError
from training.studies.noise_scale import NoiseSums, clipped, markdown, measure, rows


def test_noise_sums_recover_known_within_and_between_batch_variances():
    # g_bm = μ + a_b + e_bm with a_b ~ N(0, σ_b² I), e_bm ~ N(0, σ_w² I) in P dimensions:
    # rule noise P σ_w², batch noise P σ_b², signal ‖μ‖².  σ_w² = 4 σ_b² and M = 4, so leaving out
    # the rule/M correction of the batch noise would double it.
    gen = torch.Generator().manual_seed(0)
    P, B, M, sb, sw = 20_000, 8, 4, 0.5, 1.0
    mu = 0.5 * torch.randn(P, generator=gen, dtype=torch.float64)
    sums = NoiseSums()
    for _ in range(B):
        a = sb * torch.randn(P, generator=gen, dtype=torch.float64)
        sums.add_batch(mu + a + sw * torch.randn(M, P, generator=gen, dtype=torch.float64))
    r = sums.result()
    assert r["rule_noise"] == pytest.approx(P * sw**2, rel=0.02)
    assert r["batch_noise"] == pytest.approx(P * sb**2, rel=0.05)  # about 1% relative SE here
    assert 0 < r["batch_noise_se"] < 0.02 * P * sb**2 and abs(r["batch_noise"] - P * sb**2) < 4 * r["batch_noise_se"]
    # ‖ḡ‖² - tr Cov/B: its error 2 μ·ā + (‖ā‖² - E) has a standard deviation of about 40 here (1%)
    assert r["signal"] == pytest.approx(float(mu @ mu), rel=0.05)
    assert (r["batches"], r["draws"]) == (B, M)
    assert r["rule_noise_se"] < 0.02 * r["rule_noise"]


def test_noise_sums_refuse_too_few_draws_or_batches():
    s = NoiseSums()
    with pytest.raises(DropcheckError, match="at least 2 draws"):
        s.add_batch(torch.zeros(1, 3))
    s.add_batch(torch.zeros(2, 3))
    with pytest.raises(DropcheckError, match="same number of draws"):
        s.add_batch(torch.zeros(3, 3))
    s.add_batch(torch.zeros(2, 3))
    with pytest.raises(DropcheckError, match="at least 3 batches"):
        s.result()


def test_clipped_scales_long_rows_to_the_clip_norm_and_leaves_short_ones():
    g = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    c = clipped(g, 0.25)
    assert c[0].norm() == pytest.approx(0.25, rel=1e-5) and torch.allclose(c[1], g[1])
    assert torch.equal(clipped(g, 0.0), g)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_corpus_dir, tiny_corpus):
    from training.pipeline.configs import make_config
    from training.pipeline.trainer import train

    from .conftest import TINY

    out = tmp_path_factory.mktemp("noise_runs")
    cfg = make_config("smoke", **{**TINY, "max_steps": 4, "eval_every": 4, "run_name": "tiny-s1"})
    train(cfg, data=str(tiny_corpus_dir), out=out, config_name="smoke")
    return out


def test_each_rules_noise_matches_its_derivation_on_a_trained_model(tiny_run, tiny_corpus):
    # DROPOUT_4 averages 4 independent draws: 1/4 of DROPOUT_1's noise.  DROPOUT_4 + sqrt((1-1/4)/2) ξ̃_drop
    # adds 3/8 of the variance of a difference of two draws (2 V): V/4 + 3V/4 = V, DROPOUT_1's (Sec. 3.1).
    # No dropout: no rule noise at all.  Raw updates (before clipping), where these identities are exact.
    res = measure("tiny-s1", ["none", "dropout-k1", "dropout-k4", "inject-k4"], runs_dir=tiny_run,
                  corpus=tiny_corpus, batches=4, draws=48, seed=3, progress=False)
    a = res["arms"]
    v1 = a["dropout-k1"]["raw"]
    se = lambda arm: a[arm]["raw"]["rule_noise_se"]  # noqa: E731
    assert a["none"]["raw"]["rule_noise"] == 0.0
    assert a["dropout-k4"]["raw"]["rule_noise"] == pytest.approx(v1["rule_noise"] / 4,
                                                                 abs=4 * math.hypot(se("dropout-k4"), se("dropout-k1") / 4))
    assert a["inject-k4"]["raw"]["rule_noise"] == pytest.approx(v1["rule_noise"],
                                                                abs=4 * math.hypot(se("inject-k4"), se("dropout-k1")))
    # the standard errors are small enough for a wrong injection scale (sqrt(1-1/k): 1.75 V) to fail
    assert 4 * math.hypot(se("inject-k4"), se("dropout-k1")) < 0.5 * v1["rule_noise"]
    table = rows(res, "raw")
    assert [r["arm"] for r in table] == ["none", "dropout-k1", "dropout-k4", "inject-k4"]
    assert table[1]["rule_over_dropout1"] == 1.0
    text = markdown(res)
    assert "DROPOUT_4 + ξ̃_drop" in text and "| no dropout | 0 ± 0 |" in text
    assert res["step"] == 4 and res["run"] == "tiny-s1"
    assert all("rule_noise_se" in r and "batch_noise_se" in r for r in table)


def test_main_writes_json_markdown_and_figure(tiny_run, tiny_corpus_dir, tmp_path, capsys):
    import json

    from training.studies.noise_scale import main

    out = tmp_path / "ns"
    assert main(["tiny-s1", "--arms", "none", "dropout-k1", "--batches", "3", "--draws", "2", "--runs-dir",
                 str(tiny_run), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "tiny-s1.json").read_text())
    assert list(res["arms"]) == ["none", "dropout-k1"] and res["batches"] == 3
    assert (out / "tiny-s1.md").read_text() == markdown(res) and markdown(res) in capsys.readouterr().out
    assert (out / "noise_scale.png").stat().st_size > 0 and (out / "noise_scale.pdf").stat().st_size > 0
    (out / "tiny-s1.md").unlink()
    assert main(["tiny-s1", "--redraw", "--out", str(out)]) == 0  # no measuring: no runs dir, no corpus needed
    assert (out / "tiny-s1.md").read_text() == markdown(res)
    assert main(["nope", "--redraw", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "noise_scale: error: --redraw:" in err and "measure nope first" in err


def test_measure_refuses_too_few_batches_and_unknown_arms(tiny_run, tiny_corpus):
    with pytest.raises(DropcheckError, match="--batches >= 3"):
        measure("tiny-s1", ["none"], runs_dir=tiny_run, corpus=tiny_corpus, batches=2, progress=False)
    with pytest.raises(DropcheckError, match="has no arm 'nope'"):
        measure("tiny-s1", ["nope"], runs_dir=tiny_run, corpus=tiny_corpus, batches=3, draws=2, progress=False)
