"""``derivations emit`` on wrongly typed specs (issue 30): one error line, no traceback."""

from __future__ import annotations

import copy
import json

import pytest

from derivations.emit import main as emit_main

import torch_helpers as T  # noqa: E402  (tests/derivations is on pytest's pythonpath)


def _spoil(spec: dict, where: str) -> dict:
    spec = copy.deepcopy(spec)
    if where == "weight":
        spec["params"][0]["weight"][0][0] = "0.5"
    elif where == "ragged weight":
        spec["params"][0]["weight"][0] = spec["params"][0]["weight"][0][:-1]
    elif where == "q":
        spec["sites"][0]["q"] = "0.3"
    elif where == "X":
        spec["X"][0][0] = "one"
    return spec


@pytest.mark.parametrize("where", ["weight", "ragged weight", "q", "X"])
def test_a_wrongly_typed_spec_is_one_error_line(where, tmp_path, capsys):
    src = tmp_path / "specs.json"
    src.write_text(json.dumps([_spoil(T.tiny_q_spec(), where)]))
    assert emit_main(["emit", "--out", str(tmp_path / "o.json"), "--cases", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("derivations emit: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()
