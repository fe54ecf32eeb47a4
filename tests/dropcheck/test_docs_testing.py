"""docs/testing.md's complete user suite is complete, short, and passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropcheck.testing.pytest_plugin import plugin_args

ROOT = Path(__file__).resolve().parents[2]


def _user_suite() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    section = text.split("## A complete suite for a Hugging Face model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_user_suite_is_under_20_lines_and_uses_only_public_names():
    code = _user_suite()
    assert len(code.splitlines()) < 20
    assert "dropcheck._" not in code and "dropcheck.testing._" not in code


@pytest.mark.slow
def test_the_user_suite_from_the_docs_passes(tmp_path):
    if not os.environ.get("CI"):
        pytest.importorskip("transformers")
    (tmp_path / "test_my_model.py").write_text(_user_suite())
    env = {k: v for k, v in os.environ.items() if k not in ("DROPCHECK_HEAVY", "HYPOTHESIS_PROFILE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's dropcheck
    env["OMP_NUM_THREADS"] = "1"  # tiny models: more threads only contend (as in tests/conftest.py)
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider",
           "-o", "addopts=", "-q", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
