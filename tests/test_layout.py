"""The shape of the house, checked on the source: no stage module imports another stage (they share file names
through sftops.layout), no import circle anywhere (lazy imports inside functions count too), the data layer
never reaches up into training, evaluation or the stages, MLflow is spoken to from the tracking package alone, and
a registry alias moves in one place."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sftops"


def module_name(path: Path) -> str:
    return ".".join(("sftops", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Each module of sftops -> the sftops modules it imports, at the top or inside a function."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftops"):
                # `from sftops.train import checkpoint` imports the module sftops.train.checkpoint
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("sftops")}
        graph[name] = {m for m in found if m in modules and m not in (name, "sftops")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "sftops.stages.train" in graph["sftops.pipeline"] or "sftops.stages.train" in graph["sftops.cli"]
    assert "sftops.train.launch" in graph["sftops.cli"]  # imported inside the launch command's function


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_stage_imports_another_stage():
    graph = import_graph()
    stages = {m for m in graph if m.startswith("sftops.stages.")}
    assert stages == {f"sftops.stages.{s}" for s in ("ingest", "format", "train", "evaluate", "export")}
    crossing = sorted((a, b) for a in stages for b in graph[a] if b in stages)
    assert not crossing, f"stage modules import each other (share names through sftops.layout): {crossing}"


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_data_layer_does_not_reach_up():
    graph = import_graph()
    upward = sorted(
        (a, b)
        for a in graph
        if a.startswith("sftops.data.")
        for b in graph[a]
        if b.startswith(("sftops.stages.", "sftops.train.", "sftops.evaluate.", "sftops.tracking"))
    )
    assert not upward, f"data modules import training, evaluation or stage code: {upward}"


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


def test_only_the_tracking_package_imports_mlflow():
    importing = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "mlflow" in imported_packages(p))
    assert importing, "no module imports mlflow: the check is broken"
    outside = [p for p in importing if not p.startswith("tracking/")]
    assert not outside, f"modules outside tracking/ import mlflow: {outside}"


def test_the_tracking_package_does_not_reach_into_the_stages():
    graph = import_graph()
    upward = sorted(
        (a, b) for a in graph if a.startswith("sftops.tracking") for b in graph[a] if b.startswith("sftops.stages")
    )
    assert not upward, f"tracking imports stage code: {upward}"


def test_a_registry_alias_moves_in_one_place():
    """The promotion decision is pure (evaluate/promotion.py); tracking/registry.py applies it, and nothing else
    points an alias at a version."""
    moving = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "set_registered_model_alias" in p.read_text(encoding="utf-8")
    )
    assert moving == ["tracking/registry.py"], moving
