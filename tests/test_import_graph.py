"""The import graph of ``res_backbone`` and ``heads``: no cycles, dependencies one way.

Built from the source with :mod:`ast` (nothing is imported): every ``import``/``from ... import`` is
an edge from its module to the module it names, whether it runs at import time or later inside a
function (stricter than Python needs: a deferred import that closes a loop is a cycle here too, as
the weights modules and the engine once had). ``from pkg import name`` points at ``pkg.name`` when
that is a module, else at ``pkg`` itself.
A package's ``__init__`` is the node ``pkg``; importing ``pkg.sub`` is an edge to ``pkg.sub`` only
(Python also runs ``pkg/__init__``, but that is the parent's business and would make every
package that re-exports a submodule look cyclic).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("res_backbone", "heads")
# The model core: what a user needs to build and run a backbone; it knows no training and no data.
MODEL_CORE = ("layers", "blocks", "resnet", "fpn", "features", "registry", "timm_compat", "inference")


def _modules() -> Dict[str, Path]:
    """``{dotted name: file}`` of every module of :data:`PACKAGES` (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, name: str, modules: Dict[str, Path]) -> Set[str]:
    """Every module of ``modules`` that ``path`` (the module ``name``) imports, functions included."""
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {t for t in out if t in modules and t != name}


def import_graph() -> Dict[str, Set[str]]:
    """``{module: {modules of the two packages it imports}}``."""
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_res_backbone_never_imports_heads():
    wrong = {m: sorted(t for t in ts if t.split(".")[0] == "heads")
             for m, ts in import_graph().items() if m.split(".")[0] == "res_backbone"}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_nothing_imports_tools():
    """``tools/`` is the top of the one-way flow: scripts import the packages, never the other way."""
    wrong = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{name} imports {n}" for n in names if n.split(".")[0] == "tools"]
    assert not wrong


def test_model_core_imports_no_engine_and_no_data():
    """The core and everything it imports stay clear of training and data."""
    graph = import_graph()
    core = [f"res_backbone.{m}" for m in MODEL_CORE]
    reach, todo = set(core), list(core)
    while todo:  # what importing the core pulls in
        for t in graph.get(todo.pop(), ()):
            if t not in reach:
                reach.add(t)
                todo.append(t)
    banned = ("res_backbone.engine", "res_backbone.data")
    wrong = {m: sorted(t for t in graph[m] if t.startswith(banned)) for m in reach}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_graph_sees_the_packages():
    """The checks above are not vacuous: the graph holds the core and a known edge."""
    graph = import_graph()
    assert {f"res_backbone.{m}" for m in MODEL_CORE} <= set(graph)
    assert "res_backbone.blocks" in graph["res_backbone.resnet"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
