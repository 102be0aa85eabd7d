"""The package's modules import one way: no import circle, and the ground floor (the error type, the
method registry) imports nothing of the project."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.unit

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megatron" / "stronghold"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict:
    """{module: project modules it imports}, inside functions too (an import run on first use still
    ties the two modules together)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                for alias in node.names:  # `from . import x` names a module
                    found.add(f"{target}.{alias.name}")
                found.add(target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("megatron.stronghold")}
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def test_no_import_circle():
    graph, state, cycles = module_imports(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodules is how packages work, not a circle
    cycles = [c for c in cycles if not any(m + "." in other for m in c for other in c)]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["megatron.stronghold.errors", "megatron.stronghold.precision",
                                    "megatron.stronghold.methods.registry"])
def test_the_ground_floor_imports_nothing_of_the_project(module):
    assert module_imports()[module] == set()
