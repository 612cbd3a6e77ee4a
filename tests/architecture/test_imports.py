"""The dependency rule of DESIGN.md §1 (service → core ← training), checked on the source: no import cycle
between the project's modules (imports inside functions included), a numpy-only core, a torch-free service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blda", "calibration", "service", "training")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _third_party(prefix: str) -> dict[str, set[str]]:
    return {
        m: {i.split(".")[0] for i in _imports(p)} - {"__future__"}
        for m, p in _modules().items()
        if m.startswith(prefix)
    }


def test_the_core_needs_only_numpy_scipy_and_pydantic() -> None:
    import sys

    allowed = {
        "numpy",
        "scipy",
        "pydantic",
        "pydantic_core",
        "typer",
        "rich",
        "calibration",
        *sys.stdlib_module_names,
    }
    for module, names in _third_party("calibration").items():
        assert names <= allowed, f"{module} imports {sorted(names - allowed)}"


def test_the_service_never_imports_torch_or_training() -> None:
    for module, names in _third_party("service").items():
        assert not names & {"torch", "training"}, f"{module} imports {sorted(names & {'torch', 'training'})}"
