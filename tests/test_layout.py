"""The code's shape: stage modules import each other one way only, and the registered model's
loader imports nothing from petalflow."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith(package + ".")}
    return found


def test_stage_modules_import_each_other_one_way():
    graph = {p.stem: _imports(p, "tasks") - {p.stem}
             for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == [], f"import cycles between stage modules: {cycles}"


def test_the_model_loader_imports_nothing_from_petalflow():
    assert _imports(REPO / "tasks" / "serving.py", "tasks") == set()
    assert _imports(REPO / "tasks" / "serving.py", "flows") == set()


def test_flows_import_no_flow_module_but_the_training_one():
    """flows/ holds flows and the CLI: the watch flow reuses the train flow's home folder, the
    CLI starts flows; no flow imports the CLI or the stack runner."""
    for path in (REPO / "flows").glob("*_flow.py"):
        assert not (_imports(path, "flows") & {"cli", "stack"}), path.name
