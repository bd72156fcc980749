"""The code's shape: stage modules import each other one way only, the registered model's
loader imports nothing from petalflow, and the installed distribution claims no top-level
import name but ``petalflow``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` (e.g. ``petalflow.tasks``) that ``path`` imports anywhere (top
    level or inside functions), by their name inside the package."""
    found = set()
    prefix = package + "."
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(prefix):
                found.add(node.module[len(prefix):].split(".")[0])
            elif node.module == package:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len(prefix):].split(".")[0] for a in node.names
                      if a.name.startswith(prefix)}
    return found


def test_stage_modules_import_each_other_one_way():
    graph = {p.stem: _imports(p, "petalflow.tasks") - {p.stem}
             for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == [], f"import cycles between stage modules: {cycles}"


def test_the_model_loader_imports_nothing_from_petalflow():
    source = (REPO / "tasks" / "serving.py").read_text()
    assert "petalflow" not in {n.module.split(".")[0] for n in ast.walk(ast.parse(source))
                               if isinstance(n, ast.ImportFrom) and n.module}
    assert "import petalflow" not in source


def test_flows_import_no_flow_module_but_the_training_one():
    """flows/ holds flows and the CLI: the watch flow reuses the train flow's home folder, the
    CLI starts flows; no flow imports the CLI or the stack runner."""
    for path in (REPO / "flows").glob("*_flow.py"):
        assert not (_imports(path, "petalflow.flows") & {"cli", "stack"}), path.name


def test_installing_petalflow_claims_only_the_petalflow_import_name(tmp_path):
    """From outside the repo (where the repo's folders are not on sys.path), the installed
    distribution provides petalflow.flows and petalflow.tasks, and no top-level flows or tasks
    that would clash with the published distributions of those names."""
    import subprocess
    import sys

    probe = ("import importlib.util as u, json; print(json.dumps({m: bool(u.find_spec(m)) for m "
             "in ('petalflow', 'petalflow.flows.cli', 'petalflow.tasks.params', 'flows', "
             "'tasks')}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    import json

    assert json.loads(out) == {"petalflow": True, "petalflow.flows.cli": True,
                               "petalflow.tasks.params": True, "flows": False, "tasks": False}


def test_flows_folder_holds_flows_and_the_cli_only():
    """Each module in flows/ defines a Prefect flow, except the command line itself."""
    for path in sorted((REPO / "flows").glob("*.py")):
        if path.name in ("__init__.py", "cli.py"):
            continue
        assert "@flow(" in path.read_text(), f"{path.name} in flows/ defines no flow"
