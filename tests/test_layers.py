"""The package's structure: imports point only down the layers, no import cycles, no `print` in the
library, and the method spec the tests name is in the repository."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# bottom to top: a module may import its own layer and the layers below it, never one above
LAYERS = (
    "io", "core", "data", "store", "eval", "training", "transfer", "experiments", "serve", "cli",
)  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "kind").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """kind modules `name` imports anywhere in its body (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    stray = [m for m in MODULES if m != "kind" and _layer(m) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_point_only_down_the_layers():
    upward = [
        f"{m} ({LAYERS[_layer(m)]}) imports {t} ({LAYERS[_layer(t)]})"
        for m, targets in GRAPH.items()
        for t in targets
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    """The graph above is read from the source; this imports each module for real."""
    importlib.import_module(module)


def test_checker_sees_function_level_and_upward_imports(tmp_path):
    """The checks above could fail: a function-level import of a higher layer is caught."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from kind.cli.main import main\n")
    assert "kind.cli.main" in _imports("kind.core.fake", path)


def test_library_code_does_not_print():
    printing = [
        f"{m}:{node.lineno}"
        for m, path in MODULES.items()
        if _layer(m) != LAYERS.index("cli")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
    ]
    assert not printing, f"print() in library code (use logging or a progress bar): {printing}"


def test_method_spec_is_in_the_repository_and_current():
    spec = SRC.parent / "docs" / "KIND.md"
    assert "## Invariants a correct implementation keeps" in spec.read_text()
    shared = SRC.parents[1] / "shared" / "KIND.md"
    if not shared.is_file():
        pytest.skip("no team workspace copy of KIND.md beside the checkout to compare with")
    assert spec.read_text() == shared.read_text(), "docs/KIND.md differs from ../shared/KIND.md"
