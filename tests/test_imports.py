"""No module of fedlorm takes part in an import cycle, not even through an import inside a function.

Every ``import`` and ``from ... import`` statement of every module under src/fedlorm is read from
its syntax tree, wherever it stands (module level, inside a function, under ``if TYPE_CHECKING``),
and becomes an edge to the fedlorm module it names: ``from fedlorm.methods import METHODS`` points
at the package ``fedlorm.methods``, ``from fedlorm.methods import registry`` at the submodule.
Importing a submodule also runs its parent packages' ``__init__``; those implicit edges are left
out, since a package that re-exports its submodules would otherwise be a cycle with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fedlorm"


def _modules(src: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module and package of the package under ``src``."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module → the fedlorm modules it imports anywhere in its file."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else _owner(base, modules))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_takes_part_in_an_import_cycle():
    graph = import_graph()
    assert len(graph) > 100 and "fedlorm.cli" in graph
    assert cycles(graph) == []


IN_A_FUNCTION = {"a.py": "def f():\n    from fedlorm import b\n", "b.py": "import fedlorm.a\n"}
UNDER_TYPE_CHECKING = {
    "p/__init__.py": "",
    "p/x.py": "from fedlorm.p.y import Y\n",
    "p/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedlorm.p.x import X\n",
}
RELATIVE = {"p/__init__.py": "", "p/x.py": "from .y import Y\n", "p/y.py": "from fedlorm.p import x\n"}
RE_EXPORT = {
    "p/__init__.py": "from fedlorm.p.x import X\n",
    "p/x.py": "from . import y\n",
    "p/y.py": "X = 1\n",
}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (IN_A_FUNCTION, [["fedlorm.a", "fedlorm.b"]]),
        (UNDER_TYPE_CHECKING, [["fedlorm.p.x", "fedlorm.p.y"]]),
        (RELATIVE, [["fedlorm.p.x", "fedlorm.p.y"]]),
        (RE_EXPORT, []),
    ],
    ids=["in-a-function", "type-checking", "relative", "re-export"],
)
def test_the_checker_finds_hidden_cycles_and_no_false_ones(tmp_path, files, expected):
    """The checker itself: a cycle through a function body, a TYPE_CHECKING block or a relative
    import is found; a package that re-exports its submodule is not a cycle."""
    for name, text in {"__init__.py": "", **files}.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cycles(import_graph(tmp_path)) == expected
