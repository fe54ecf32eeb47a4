"""``dropcheck bench`` at a tiny size: the JSON has its schema and every arm
was timed (no assertion on the timings themselves: they are noisy)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dropcheck.cli import main
from training.studies.bench import ARMS, BASELINE, SCHEMA

TINY = ["emb=4", "hidden=5", "layers=2", "bptt=4", "batch_size=2"]


def test_bench_writes_the_json_and_times_every_arm(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--config", "smoke", "--device", "cpu", "--warmup", "1", "--repeats", "2", "--vocab", "20",
            "--threads", "1", "--no-progress", "--out", str(out), *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "x dropout" in text and "CPU timing (not a GPU result)" in text

    res = json.loads(out.read_text())
    assert res["schema"] == SCHEMA
    for key in ("device_type", "device", "device_name", "label", "torch", "python", "threads", "git_commit",
                "config_name", "config", "vocab", "bptt", "batch_size", "tokens_per_step", "dtype", "warmup",
                "repeats", "protocol", "memory_metric", "baseline", "arms", "wall_s"):
        assert key in res, key
    assert res["device_type"] == "cpu" and res["torch"] == torch.__version__
    assert (res["config_name"], res["vocab"], res["warmup"], res["repeats"]) == ("smoke", 20, 1, 2)
    assert res["config"]["emb"] == 4 and res["tokens_per_step"] == 4 * 2
    assert res["baseline"] == BASELINE

    arms = {a["label"]: a for a in res["arms"]}
    assert list(arms) == [a.name for a in ARMS]
    for label, a in arms.items():
        assert a["error"] is None, (label, a["error"])
        assert len(a["ms"]) == 2 and all(t > 0 for t in a["ms"]), label
        assert a["median_ms"] > 0 and a["iqr_ms"] >= 0 and a["q25_ms"] <= a["median_ms"] <= a["q75_ms"]
        assert a["tokens_per_s"] > 0 and math.isfinite(a["tokens_per_s"])
        assert a["ratio_to_baseline"] > 0
        assert a["backend"] in ("fused", "loop") and a["backend_impl"]
        assert a["param_bytes"] > 0
        assert a["peak_mem_bytes"] is None or a["peak_mem_bytes"] >= 0
        # the rules that differentiate through a gradient run on the loop LSTM (cuDNN has none)
        if a["double_backward"]:
            assert a["backend"] == "loop", label
    assert arms[BASELINE]["ratio_to_baseline"] == 1.0
    assert (arms["dropout"]["backend"], arms["dropout-loop"]["backend"]) == ("fused", "loop")
    assert arms["explicit_implicit-fd_shared"]["estimator"] == "fd_shared"
    assert arms["explicit_implicit-autograd"]["double_backward"] and not arms["explicit_implicit-fd"]["double_backward"]
    assert arms["dropout-k4"]["k"] == 4


def test_bench_arm_selection_and_errors(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--warmup", "0", "--repeats", "1", "--vocab", "20", "--no-progress", "--out", str(out), *TINY]
    assert main(args + ["--arms", "explicit_implicit-fd_shared"]) == 0
    res = json.loads(out.read_text())
    assert [a["label"] for a in res["arms"]] == [BASELINE, "explicit_implicit-fd_shared"]  # the baseline is kept
    capsys.readouterr()
    assert main(args + ["--arms", "nope"]) == 2
    assert "unknown arm(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--list"]) == 0
    assert "explicit_implicit-fd_shared" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--vocab", "1"]])
def test_bench_rejects_bad_sizes(bad, capsys):
    assert main(["bench", "--no-progress", *bad]) == 2
    assert "must be" in capsys.readouterr().err


def test_a_failing_arm_is_reported_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    from training.pipeline.trainer import Trainer

    real = Trainer.step

    def flaky(self, *args):
        if self.rule.name == "none":
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args)

    monkeypatch.setattr(Trainer, "step", flaky)
    out = tmp_path / "b.json"
    args = ["bench", "--warmup", "1", "--repeats", "2", "--vocab", "20", "--no-progress", "--out", str(out),
            "--arms", "none,dropout-k4", *TINY]
    assert main(args) == 1
    assert "none: RuntimeError: out of memory (simulated)" in capsys.readouterr().out
    arms = {a["label"]: a for a in json.loads(out.read_text())["arms"]}
    assert arms["none"]["median_ms"] is None and "simulated" in arms["none"]["error"]
    assert arms["dropout-k4"]["error"] is None and arms["dropout-k4"]["ratio_to_baseline"] > 0


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """training/scripts/gpu_check.sh with DRY_RUN=1: the same commands on CPU at a tiny
    size, so that the script a GPU session will run has no plumbing error."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "training" / "scripts" / "gpu_check.sh"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads((tmp_path / "cpu-bench.json").read_text())
    assert all(a["error"] is None and a["median_ms"] > 0 for a in bench["arms"])
    fd = json.loads((tmp_path / "fd_check.json").read_text())
    assert set(fd["settings"]) == {"float64", "float32"} and fd["pass"]
    assert fd["settings"]["float32"]["xi_fd_rel_error"]["median"] < 1e-3
    assert fd["device_name"] == bench["device_name"]  # one reader of the processor's name
    gpt2 = json.loads((tmp_path / "cpu-bench-gpt2.json").read_text())
    assert all(a["error"] is None and a["median_ms"] > 0 for a in gpt2["arms"])
    assert {a["backend_impl"] for a in gpt2["arms"]} == {"gpt2"}
    for name in ("nvidia-smi.txt", "bench.log", "bench-gpt2.log", "fd_check.log"):
        assert (tmp_path / name).exists()


def test_sweep_writes_every_point_and_the_plot(tmp_path):
    from training.studies.bench import plot_sweep, sweep

    over = ["emb=4", "layers=2", "bptt=4", "batch_size=2"]
    res = sweep("smoke", over, vocabs=(20, 40), hiddens=(3, 5), base_vocab=20, arms=("dropout", "explicit-fd_mid"),
                warmup=0, repeats=1)
    assert [p["vocab"] for p in res["vocab"]] == [20, 40] and [p["hidden"] for p in res["hidden"]] == [3, 5]
    for p in res["vocab"] + res["hidden"]:
        assert p["ratio"]["dropout"] == 1.0 and p["ratio"]["explicit-fd_mid"] > 0 and not p["errors"]
    plot_sweep(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_bench_times_every_rule_on_gpt2_once(tmp_path, capsys):
    """arch=gpt2 has no LSTM backend: each rule is one arm (the -loop variants,
    which differ from another arm by the backend alone, are dropped)."""
    from training.studies.bench import bench

    res = bench("smoke-gpt2", ["emb=8", "heads=2", "bptt=6", "batch_size=4", "layers=1"], warmup=0, repeats=1,
                vocab=20, progress=False)
    labels = [a["label"] for a in res["arms"]]
    assert "dropout-loop" not in labels and "dropout" in labels and "explicit_implicit-fd_shared" in labels
    assert len(labels) == len(set(tuple(sorted(a.overrides.items())) for a in ARMS))
    for a in res["arms"]:
        assert a["error"] is None, (a["label"], a["error"])
        assert a["backend_impl"] == "gpt2" and a["median_ms"] > 0
