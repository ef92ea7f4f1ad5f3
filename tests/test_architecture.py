"""The package's shape (issue #21): no import cycle among tangent_kernels' modules, no
private name used across subpackages, no source file over 500 lines.

Read from the source (ast), not from an import: an import inside a function counts as
much as one at the top of a module (it is a cycle the first call closes); imports under
``if TYPE_CHECKING:`` never run and do not count. A subpackage is a folder of
tangent_kernels (``persample``, ``distributed``, ...); the top-level modules are one
subpackage of their own. Within one subpackage, private names are that subpackage's
business; across subpackages a module uses only public (no leading underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent / "tangent_kernels"
PACKAGE = "tangent_kernels"
MAX_LINES = 500


def _modules() -> Dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in PACKAGES:
        return ".".join(parts[:2])
    return PACKAGE


def _owner(name: str) -> str:
    """The module that ``name`` (a dotted path) is, or the nearest one that holds it."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: the bodies of ``if TYPE_CHECKING:`` left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _source(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _scan() -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> the tangent_kernels modules it imports, the private uses across subpackages)."""
    graph: Dict[str, Set[str]] = {}
    private: List[str] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: Set[str] = set()
        aliases: Dict[str, str] = {}  # local name -> the tangent_kernels module it is bound to
        nodes = list(_runtime_nodes(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                source = _source(module, node)
                if not source.startswith(PACKAGE):
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    edges.add(full if full in MODULES else _owner(source))
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
                    if alias.name.startswith("_") and not alias.name.startswith("__") \
                            and _subpackage(_owner(source)) != _subpackage(module):
                        private.append(f"{module}: from {source} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        edges.add(_owner(alias.name))
                        if alias.asname:
                            aliases[alias.asname] = _owner(alias.name)
        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                target = aliases[node.value.id]
                if node.attr.startswith("_") and not node.attr.startswith("__") \
                        and _subpackage(target) != _subpackage(module):
                    private.append(f"{module}: {target}.{node.attr}")
        edges.discard(module)
        graph[module] = {e for e in edges if e in MODULES}
    return graph, private


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    # A scan that found nothing would pass every check below.
    graph, _ = _scan()
    assert len(MODULES) > 50 and f"{PACKAGE}.engine" in graph
    assert f"{PACKAGE}.tiles" in graph[f"{PACKAGE}.engine"]
    assert f"{PACKAGE}.distributed.driver" in graph[f"{PACKAGE}.pipeline"]


def test_the_checks_catch_what_they_look_for():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _subpackage(f"{PACKAGE}.persample.extractor") == f"{PACKAGE}.persample"
    assert _subpackage(f"{PACKAGE}.persample") == f"{PACKAGE}.persample"
    assert _subpackage(f"{PACKAGE}.engine") == PACKAGE


def test_no_import_cycle():
    graph, _ = _scan()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module-level and function-level imports): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_engine_and_driver_do_not_import_each_other():
    graph, _ = _scan()
    assert f"{PACKAGE}.distributed.driver" not in graph[f"{PACKAGE}.engine"]
    assert f"{PACKAGE}.engine" not in graph[f"{PACKAGE}.distributed.driver"]


def test_no_private_name_across_subpackages():
    _, private = _scan()
    assert not private, "private names used across subpackages:\n" + "\n".join(private)


def test_no_source_file_over_500_lines():
    long = {str(path.relative_to(ROOT.parent)): n for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
