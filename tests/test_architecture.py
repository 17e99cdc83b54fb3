"""The package's import structure (LAYOUT.md / projectdesign.md): no import cycle, no underscore name imported
across modules, and every import in the documented direction.

Direction, from the top: system -> {runlog, report, toy, integrations} -> lifecycle -> ops -> adapters
-> {observe, layers} -> trace -> {routing, bias, balance, telemetry, governance}
-> {config, clocks, view, jsonl, checkpoint, grouped, version}.
A room may import its own rooms and anything below it; never above. Also never: ops -> observe (the weights
side does not know the fast clock) and anything -> system (only the package root re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chronomoe_v3"

RANK = {
    "system": 9,
    "runlog": 8, "report": 8, "toy": 8, "integrations": 8, "distributed": 8,
    "lifecycle": 7,
    "ops": 6,
    "adapters": 5,
    "observe": 4, "layers": 4,
    "trace": 3,
    "routing": 2, "bias": 2, "balance": 2, "telemetry": 2, "governance": 2,
    "config": 1, "clocks": 1, "view": 1, "jsonl": 1, "checkpoint": 1, "grouped": 1, "version": 1,
}
FORBIDDEN = {("ops", "observe"), ("observe", "ops"), ("observe", "lifecycle"), ("ops", "lifecycle")}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect() -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported module, imported names, line)] for imports of our own package."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        edges = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                if not target.startswith("chronomoe_v3"):
                    continue
                names = [a.name for a in node.names]
                # `from .pkg import module` imports the module, not a name
                submodules = [n for n in names if f"{target}.{n}" in modules]
                if submodules:
                    edges += [(f"{target}.{n}", [], node.lineno) for n in submodules]
                    names = [n for n in names if n not in submodules]
                if names or not submodules:
                    edges.append((target, names, node.lineno))
            elif isinstance(node, ast.Import):
                edges += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("chronomoe_v3")]
        out[name] = edges
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__root__"


GRAPH = collect()


def test_every_room_has_a_place_in_the_direction():
    rooms = {room(m) for m in GRAPH} - {"__root__"}
    assert rooms <= set(RANK), f"rooms without a rank (place them in the documented direction): {rooms - set(RANK)}"


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in edges if t in GRAPH and t != m} for m, edges in GRAPH.items()}
    # a package's __init__ importing its own submodules is how packages work; a submodule importing its own
    # package's __init__ back would be a cycle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_underscore_name_is_imported_across_modules():
    bad = [
        f"{m}:{line} imports {n} from {t}"
        for m, edges in GRAPH.items() for t, names, line in edges for n in names
        if n.startswith("_") and not n.startswith("__") and t != m
    ]
    assert not bad, bad


def test_imports_follow_the_documented_direction():
    bad = []
    for m, edges in GRAPH.items():
        src = room(m)
        if src == "__root__":
            continue
        for t, _, line in edges:
            dst = room(t)
            if dst == src:
                continue
            if dst == "__root__":
                bad.append(f"{m}:{line} imports the package root (import the module itself)")
            elif RANK[dst] > RANK[src]:
                bad.append(f"{m}:{line} ({src}, rank {RANK[src]}) imports {t} ({dst}, rank {RANK[dst]}): upwards")
            elif (src, dst) in FORBIDDEN:
                bad.append(f"{m}:{line} imports {t}: {src} must never import {dst}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation():
    """The checker itself can fail: a synthetic upward import is reported."""
    assert RANK["observe"] < RANK["ops"] and ("observe", "ops") in FORBIDDEN
    tree = ast.parse("from ..ops.registry import ExpertRegistry\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    assert room(resolve("chronomoe_v3.observe.observer", False, node)) == "ops"
