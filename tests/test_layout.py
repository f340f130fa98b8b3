"""The layout shows the data path: arrows point down only (dynalign → offline, learner,
serving → shared), learner/ and serving/ never import each other, and no module imports itself
back through others. Function-level imports count too: deferring an import hides a cycle, it
does not remove it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dynalign", "offline", "learner", "serving", "shared")
# What each package may import from the project besides itself.
ALLOWED = {
    "shared": set(),
    "serving": {"shared"},
    "learner": {"shared"},
    "offline": {"shared"},
    "dynalign": {"offline", "learner", "serving", "shared"},
}


def _module(name: str) -> str | None:
    """The project module a dotted name refers to ("pkg" is its __init__), or None."""
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").exists():
        return name
    if (path / "__init__.py").exists():
        return name + ".__init__"
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            targets = graph.setdefault(module, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    # "from serving import metrics" imports serving/metrics.py
                    names = [
                        f"{node.module}.{alias.name}"
                        if _module(f"{node.module}.{alias.name}")
                        else node.module
                        for alias in node.names
                    ]
                else:
                    continue
                targets.update(t for t in map(_module, names) if t and t != module)
    return graph


def test_packages_import_only_downwards():
    wrong = sorted(
        (source, target)
        for source, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[source.split(".")[0]] | {source.split(".")[0]}
    )
    assert wrong == []


def test_no_module_imports_itself_back():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as cycle:
        raise AssertionError(f"import cycle: {' -> '.join(cycle.args[1])}") from None
