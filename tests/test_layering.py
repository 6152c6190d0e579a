"""The package layering: imports point down only (kernels -> blocks -> zoo -> tools), nothing there
imports the tests, and no module imports itself back through a cycle. Run on its own as `python -m pytest tests/test_layering.py -v`.

The graph holds every explicit `import` / `from ... import` in the library's source, module level
and inside functions alike; `from pkg import name` counts as an import of `pkg.name` when that is
a module. (Python also runs a package's `__init__` before any of its submodules; that implicit
edge is not an import a module writes, so it is not counted.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "blocks", "zoo", "tools"]  # each may import only from itself and those before it


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules that `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_imports_point_down_only():
    wrong = []
    for name, targets in GRAPH.items():
        rank = LAYERS.index(name.split(".")[0])
        wrong += [f"{name} -> {t}" for t in targets if LAYERS.index(t.split(".")[0]) > rank]
    assert not wrong, "imports that point up the layers " + " > ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_library_and_tools_never_import_the_tests():
    """Tests are not installed with the package: nothing a user runs may need them."""
    wrong = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{name} -> {t}" for t in targets if t == "tests" or t.startswith("tests.")]
    assert not wrong, "imports of the test suite:\n" + "\n".join(wrong)


def _cycle() -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node: str) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        colour[node] = "black"
        stack.pop()
        return None

    for start in sorted(GRAPH):
        if start not in colour and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_op_package_keeps_its_contract_apart_from_its_backends():
    """kernels/<op>/contract.py defines the op; backends import the contract, never the package."""
    for init in sorted((ROOT / "kernels").glob("*/__init__.py")):
        op = init.parent.name
        assert (init.parent / "contract.py").exists(), f"kernels/{op} has no contract.py"
        for backend in init.parent.glob("*.py"):
            if backend.name in ("__init__.py", "contract.py"):
                continue
            assert f"kernels.{op}" not in GRAPH[f"kernels.{op}.{backend.stem}"], \
                f"kernels/{op}/{backend.name} imports its package; import kernels.{op}.contract instead"
