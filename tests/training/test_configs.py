"""Configs: named ones are valid, overrides are typed, bad keys/values are
rejected with one clear error naming the key."""

from __future__ import annotations

import json

import pytest

from dropcheck import DropcheckError
from training.pipeline.configs import CONFIGS, DEFAULTS, get_config, make_config, parse_overrides, run_name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_configs_validate(name):
    n, cfg = get_config(name)
    assert n == name and set(cfg) == set(DEFAULTS)


def test_paper_settings():
    for name, corpus in (("ptb", "ptb"), ("wikitext2", "wikitext-2")):
        cfg = make_config(name)
        assert cfg["corpus"] == corpus
        assert (cfg["emb"], cfg["hidden"], cfg["layers"], cfg["tie"]) == (400, 1150, 3, True)
        assert [cfg[f"q_{g}"] for g in ("embedding", "hidden", "output", "weights")] == [0.4] * 4
        assert (cfg["lr"], cfg["clip"], cfg["weight_decay"], cfg["bptt"], cfg["batch_size"]) == (30.0, 0.25, 1.2e-6, 70, 20)
        assert cfg["optimizer"] == "sgd"
    smoke = make_config("smoke")
    assert smoke["train_tokens"] > 0 and smoke["device"] == "cpu"


def test_overrides_take_the_type_of_the_default():
    over = parse_overrides(["lr=5", "k=4", "tie=false", "rule=explicit", "q_hidden=0.25", "max_steps=1e3"])
    assert over == {"lr": 5.0, "k": 4, "tie": False, "rule": "explicit", "q_hidden": 0.25, "max_steps": 1000}
    assert isinstance(over["lr"], float) and isinstance(over["k"], int)
    _, cfg = get_config("smoke", ["rule=dropout_inject", "k=8", "seed=3"])
    assert run_name("smoke", cfg) == "smoke-dropout_inject-k8-s3"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["learning_rate=3"], r"unknown config key 'learning_rate'"),
        (["dropout=0.4"], r"unknown config key 'dropout'"),
        (["k=two"], r"config key 'k': expected an integer, got 'two'"),
        (["k=1.5"], r"config key 'k': expected an integer"),
        (["k=0"], r"config key 'k': must be >= 1"),
        (["lr=fast"], r"config key 'lr': expected a number"),
        (["lr=0"], r"config key 'lr': must be > 0"),
        (["lr=nan"], r"config key 'lr': must be a finite number"),
        (["q_hidden=1.0"], r"config key 'q_hidden': drop probability must lie in \[0, 1\)"),
        (["rule=dropconnect"], r"config key 'rule': expected one of"),
        (["estimator=magic"], r"config key 'estimator': expected one of"),
        (["tie=maybe"], r"config key 'tie': expected a boolean"),
        (["device=tpu"], r"config key 'device'"),
        (["explicit_mult_hiden=2"], r"unknown config key 'explicit_mult_hiden' \(did you mean 'explicit_mult_hidden'"),
        (["lr"], r"not of the form key=value"),
        (["epochs=0", "max_steps=0"], r"config key 'epochs'"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(DropcheckError, match=message):
        get_config("smoke", overrides)


def test_json_config_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"base": "smoke", "rule": "explicit", "lr": 10}))
    name, cfg = get_config(str(f), ["k=2"])
    assert name == "mine" and cfg["rule"] == "explicit" and cfg["lr"] == 10.0 and cfg["emb"] == 32 and cfg["k"] == 2
    f.write_text(json.dumps({"base": "smoke", "hiden": 3}))
    with pytest.raises(DropcheckError, match=r"mine.json: unknown config key 'hiden'"):
        get_config(str(f))
    f.write_text(json.dumps({"tie": "yes"}))
    with pytest.raises(DropcheckError, match=r"config key 'tie': expected true or false"):
        get_config(str(f))
    f.write_text("{not json")
    with pytest.raises(DropcheckError, match="cannot read it as JSON"):
        get_config(str(f))
    f.write_text(json.dumps({"base": "nope"}))
    with pytest.raises(DropcheckError, match="unknown base config 'nope'"):
        get_config(str(f))
    with pytest.raises(DropcheckError, match="unknown config 'nothing'"):
        get_config("nothing")


def test_cli_reports_bad_keys_in_one_line_and_exits_2(capsys):
    from dropcheck.cli import main

    rc = main(["train", "--config", "smoke", "hidden_size=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "unknown config key 'hidden_size'" in err[0]
    assert main(["train", "--config", "smoke", "--show", "k=3"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 3
    assert main(["train", "--list"]) == 0
    assert "mini-ptb" in capsys.readouterr().out


def test_keys_older_logs_lack_are_listed_with_their_defaults():
    """Every config key missing from some committed log is in ``log_schema.LATER_KEYS`` with its
    DEFAULTS value, so the reader groups a seed run today with the seeds run before the key existed
    (a new key without an entry there fails here, at its first new log)."""
    import json
    from pathlib import Path

    from paper_figures.log_schema import LATER_KEYS

    root = Path(__file__).resolve().parents[2] / "results" / "runs"
    missing = set()
    for path in root.rglob("*.jsonl"):
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
        if header.get("type") == "header":
            missing |= set(DEFAULTS) - set(header["config"])
    assert missing <= set(LATER_KEYS), f"keys some logs lack, not in LATER_KEYS: {sorted(missing - set(LATER_KEYS))}"
    for key, value in LATER_KEYS.items():
        assert DEFAULTS[key] == value, key
