"""The import graph keeps its layers: ``paper_figures`` reads logs only.

Static: every ``import`` statement of every module (function-local ones too,
which a runtime check of ``sys.modules`` can miss) is read from the source.
``paper_figures`` never imports ``training``; only its command-line front end
(``cli.py``, for ``DropcheckError``) imports ``dropcheck``, and nothing
imports torch.  The runtime side is
``tests/paper_figures/test_rule_labels.py`` (a subprocess import).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (relative imports
    stay inside the package and are left out)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_import_reader_sees_local_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os.path\nfrom . import x\ndef f():\n    from training.rules import R\n    import torch\n")
    assert imported_packages(f) == {"os", "training", "torch"}


def test_paper_figures_imports_neither_training_nor_torch():
    bad = {}
    for path in sorted((ROOT / "paper_figures").glob("*.py")):
        allowed_core = {"dropcheck"} if path.name == "cli.py" else set()
        hits = imported_packages(path) & ({"training", "torch", "dropcheck"} - allowed_core)
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"paper_figures modules importing the trainer or torch: {bad}"
