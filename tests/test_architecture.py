"""The layout docs/architecture.md describes: the folders of scripts/ are floors, and a module imports only from its
own folder or from floors below it, so no folder imports another in a circle.

Run it as a script to print which folder imports which (``python -m tests.test_architecture``)."""
from __future__ import annotations

import ast
from pathlib import Path

from scripts.core.settings import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"

#: The floors, lowest first (docs/architecture.md). A unit is a folder of scripts/ or a top-level module.
LAYERS: tuple[str, ...] = ("core", "families", "sources", "recipe", "peers", "convert", "runtimes", "serve", "proof",
                           "doctor", "pipeline", "commands")


def _unit(path: Path) -> str:
    rel = path.relative_to(SCRIPTS).parts
    return rel[0] if len(rel) > 1 else path.stem


def _imported_units(tree: ast.AST) -> list[tuple[str, int]]:
    """``(unit, line)`` of every ``scripts.*`` import in a module, at top level or inside functions."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([f"scripts.{a.name}" for a in node.names] if node.module == "scripts" else [node.module])
        for name in names:
            parts = name.split(".")
            if parts[0] == "scripts" and len(parts) > 1:
                found.append((parts[1], node.lineno))
    return found


def folder_imports() -> dict[str, dict[str, list[str]]]:
    """``{unit: {imported unit: ["file:line", ...]}}`` over every module of scripts/ (imports of its own unit left
    out)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        if path.parent == SCRIPTS and path.name == "__init__.py":
            continue
        src = _unit(path)
        for dst, line in _imported_units(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if dst != src:
                graph.setdefault(src, {}).setdefault(dst, []).append(f"{path.relative_to(REPO_ROOT)}:{line}")
    return graph


def upward_imports(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every import of a unit that is not on a lower floor than the importer (or that no floor lists)."""
    floor = {u: i for i, u in enumerate(LAYERS)}
    problems = []
    for src, targets in sorted(graph.items()):
        for dst, where in sorted(targets.items()):
            if src not in floor or dst not in floor:
                problems.append(f"{src} -> {dst}: not in LAYERS (add the new folder to docs/architecture.md and "
                                f"tests/test_architecture.py): {where[0]}")
            elif floor[dst] >= floor[src]:
                problems.append(f"{src} imports {dst}, which is not below it ({', '.join(where)})")
    return problems


def test_every_unit_of_scripts_is_on_a_floor():
    units = {_unit(p) for p in SCRIPTS.rglob("*.py")} - {"__init__"}
    assert units == set(LAYERS), f"not in LAYERS: {units - set(LAYERS)}; gone: {set(LAYERS) - units}"


def test_folders_import_only_from_lower_floors():
    assert upward_imports(folder_imports()) == []


def test_the_checker_sees_an_upward_import():
    assert upward_imports({"core": {"proof": ["scripts/core/x.py:3"]}}) == [
        "core imports proof, which is not below it (scripts/core/x.py:3)"]
    assert _imported_units(ast.parse("def f():\n    from scripts.proof import bench\n")) == [("proof", 2)]


def test_architecture_page_lists_the_floors_in_order():
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    positions = [text.find(f"`scripts/{u}") for u in LAYERS]
    assert -1 not in positions, [u for u, p in zip(LAYERS, positions) if p == -1]
    assert positions == sorted(positions), "docs/architecture.md lists the floors in another order than LAYERS"


if __name__ == "__main__":
    for src, targets in sorted(folder_imports().items(), key=lambda kv: LAYERS.index(kv[0])):
        print(f"{src:9} -> " + ", ".join(f"{d} ({len(w)})" for d, w in
                                         sorted(targets.items(), key=lambda kv: LAYERS.index(kv[0]))))
    print("\n".join(upward_imports(folder_imports())) or "no upward imports: no folder imports in a circle")
