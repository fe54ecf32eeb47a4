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
    f.write_text("import os.path\nfrom . import x\ndef f():\n    from training.pipeline.rules import R\n    import torch\n")
    assert imported_packages(f) == {"os", "training", "torch"}


def test_paper_figures_imports_neither_training_nor_torch():
    bad = {}
    for path in sorted((ROOT / "paper_figures").glob("*.py")):
        allowed_core = {"dropcheck"} if path.name == "cli.py" else set()
        hits = imported_packages(path) & ({"training", "torch", "dropcheck"} - allowed_core)
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"paper_figures modules importing the trainer or torch: {bad}"


# --------------------------------------------------------------------------
# dropcheck's own modules form layers: no import cycle, function-local imports included


def module_name(path: Path, root: Path) -> str:
    """``dropcheck/_sites.py`` -> ``dropcheck._sites``; a package's
    ``__init__.py`` is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` over every
    ``.py`` file under ``root/package`` (subpackages too), read with ``ast``
    so that imports inside functions count.  ``from . import x`` is an edge to
    the module ``x`` when there is one, else to the package; an import of a
    submodule is an edge to that submodule only (not to its parents'
    ``__init__``)."""
    files = sorted((root / package).rglob("*.py"))
    names = {module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        is_pkg = path.name == "__init__.py"
        pkg = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_graph_reader_resolves_relative_and_local_imports_and_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("import os\nfrom ._b import g\n")
    (pkg / "_b.py").write_text("def g():\n    from . import c\n")
    (pkg / "c.py").write_text("from .sub.d import h\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("def h():\n    from .. import a\n    import pkg._b\n")
    graph = package_graph("pkg", tmp_path)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg._b"}, "pkg._b": {"pkg.c"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.a", "pkg._b"}}
    assert find_cycle(graph) == ["pkg._b", "pkg.c", "pkg.sub.d", "pkg._b"]  # the first module in sorted order
    graph["pkg.sub.d"] = set()  # the function-local edges were the only way back
    assert find_cycle(graph) == []


def test_dropcheck_modules_import_each_other_without_a_cycle():
    graph = package_graph("dropcheck")
    assert "dropcheck._analytic" in graph and graph["dropcheck._analytic"], "the reader found no dropcheck imports"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle in dropcheck/ (function-local imports count): " + " -> ".join(cycle)


def test_training_rooms_import_downwards_only():
    """``training/``'s rooms (``training/__init__.py``): ``pipeline`` and
    ``models`` never import ``studies`` or the ``dropcheck train`` front end,
    and the package has no import cycle."""
    graph = package_graph("training")
    assert "training.pipeline.trainer" in graph and "training.studies.reproduce" in graph, sorted(graph)
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if a.startswith(("training.pipeline", "training.models"))
                    and b.startswith(("training.studies", "training.cli")))
    assert not upward, f"the pipeline or a model imports a study or the CLI: {upward}"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle in training/: " + " -> ".join(cycle)
