"""The layout's rules, read from the source (docs/architecture.md): the lower layers never import transformers, the
package's modules import each other without a cycle, and no module imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mode_hf"
NO_TRANSFORMERS = ("algo", "model", "calibrate")  # pure torch: tensors and nn.Module structure only


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken, at module level) for every import of the file, relative ones resolved;
    imports under `if TYPE_CHECKING:` are left out (they never run)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, [alias.name for alias in child.names], top))
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    visit(tree, True)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_the_lower_layers_never_import_transformers():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {target}"
        for path in FILES
        if path.relative_to(PACKAGE).parts[0] in NO_TRANSFORMERS
        for target, _, _ in imports(path)
        if target.split(".")[0] == "transformers"
    ]
    assert not offenders


def test_module_level_imports_have_no_cycle():
    modules = {module_name(p) for p in FILES}
    graph: dict[str, set[str]] = {}
    for path in FILES:
        edges = set()
        for target, names, top in imports(path):
            if not top or not target.startswith("mode_hf"):
                continue
            # `from pkg import module` imports the module; `from module import name` the module itself
            edges |= {f"{target}.{n}" for n in names if f"{target}.{n}" in modules} or {target}
        graph[module_name(path)] = {e for e in edges if e in modules and e != module_name(path)}
    packages = {m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt in packages and nxt != "mode_hf":
                continue  # a package's __init__ holds no code of its own that imports back
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, trail + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            assert cycle_from(start, [start]) is None


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: from {target} import {name}"
        for path in FILES
        for target, names, _ in imports(path)
        if target.startswith("mode_hf")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offenders


@pytest.mark.parametrize("layer", NO_TRANSFORMERS)
def test_the_rules_see_the_layers(layer):
    """The checks above read real files: every layer has modules with imports."""
    assert any(imports(p) for p in FILES if p.relative_to(PACKAGE).parts[0] == layer)
