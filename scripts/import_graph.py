"""The import graph of ``src/engram``, read with ``ast``: cycles, and the layer order the packages keep.

    python scripts/import_graph.py             # check: print every cycle and every edge against LAYERS, exit 1 if any
    python scripts/import_graph.py --mermaid   # the package graph as a mermaid block (docs/design.md)
    python scripts/import_graph.py --dot       # the same graph for Graphviz (| dot -Tsvg > graph.svg)

An arrow points from the importer to the imported. The pictures leave out an arrow that a path of other arrows
already implies (the transitive reduction: no ``serve -> model``, since ``serve -> memory`` leads there);
``--all-edges`` draws every one.

Every ``import`` and ``from ... import`` counts, wherever it stands: at the top, inside a function, under ``if
TYPE_CHECKING:``; relative imports are resolved, and so are ``importlib.import_module("engram....")`` calls with a
literal name. ``from package import name`` is an edge to ``package.name`` when that is a module, else to the
package's ``__init__``. A *unit* is a top-level package or module of ``engram`` (``model``, ``config``, ...); the
package's own ``__init__.py`` (the public names) is the unit ``__init__``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "engram"
ROOT_UNIT = "__init__"  # engram/__init__.py
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lowest first. A unit may import units of its own layer or lower ones, never a higher one; kernels import nothing
# outside kernels. Every unit of the package must be listed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("kernels",)),
    ("core", ("atomic", "fetch", "primes", "tokenizer", "config", "hashing", "storage", "embedding", "layer")),
    ("model", ("model", "models", "parallel")),
    ("data", ("data",)),
    ("apps", ("train", "inspection", "memory", "serve", "demo", "hf")),
    ("cli", ("cli", "__main__", ROOT_UNIT)),
)
LEAF = "kernels"

Graph = dict[str, set[str]]


def module_files(source: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package under ``source``: dotted name -> file (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(source.rglob("*.py")):
        parts = (source.name, *path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, str | None]]:
    """(module, name or None) for every import in ``tree``: ``from m import n`` gives (m, n), ``import m`` (m, None)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield base, alias.name
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "importlib" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.args[0].value, None


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The innermost known module that ``name`` is, or lies in (``engram.model.EngramLM`` -> ``engram.model``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def module_graph(source: Path = SOURCE) -> Graph:
    """Module -> the package's modules it imports (self-imports left out)."""
    modules = module_files(source)
    graph: Graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for base, name in _imported_names(tree, module, path.name == "__init__.py"):
            if base != source.name and not base.startswith(source.name + "."):
                continue
            submodule = f"{base}.{name}" if name else None
            target = submodule if submodule in modules else _resolve(base, modules)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def unit(module: str) -> str:
    """The top-level package or module ``module`` belongs to (``engram.model.lm`` -> ``model``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_UNIT


def unit_graph(graph: Graph) -> Graph:
    """The graph between units: an edge where any module of one imports any module of another."""
    units: Graph = {unit(module): set() for module in graph}
    for module, targets in graph.items():
        units[unit(module)] |= {unit(t) for t in targets if unit(t) != unit(module)}
    return units


def reduced(graph: Graph) -> Graph:
    """``graph`` less every edge ``a -> b`` that another path from ``a`` to ``b`` implies."""

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    return {a: {b for b in targets if not any(b in reachable(c) for c in targets - {b})}
            for a, targets in graph.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each as its nodes, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_in(graph: Graph, component: Iterable[str]) -> list[str]:
    """A shortest cycle ``[a, b, ..., a]`` through the first node of a strongly connected ``component``."""
    component = set(component)
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def layer_of() -> dict[str, int]:
    """Unit -> its index in :data:`LAYERS`."""
    return {name: i for i, (_, units) in enumerate(LAYERS) for name in units}


def layer_violations(graph: Graph) -> list[str]:
    """Every module edge that breaks the layer order, and every unit :data:`LAYERS` does not place."""
    layers = layer_of()
    problems = [f"{name} is in no layer of LAYERS in {Path(__file__).name}"
                for name in sorted({unit(module) for module in graph} - set(layers))]
    names = [name for name, _ in LAYERS]
    for module in sorted(graph):
        for target in sorted(graph[module]):
            source_unit, target_unit = unit(module), unit(target)
            if source_unit not in layers or target_unit not in layers or source_unit == target_unit:
                continue
            if source_unit == LEAF:
                problems.append(f"{module} -> {target}: {LEAF} imports nothing outside {LEAF}")
            elif layers[target_unit] > layers[source_unit]:
                problems.append(f"{module} -> {target}: layer {names[layers[source_unit]]} imports the higher "
                                f"layer {names[layers[target_unit]]}")
    return problems


def _node(name: str) -> str:
    return "pkg_" + "".join(c if c.isalnum() else "_" for c in name)


def _label(name: str) -> str:
    return f"{PACKAGE} ({ROOT_UNIT})" if name == ROOT_UNIT else name


def mermaid(units: Graph) -> str:
    """The unit graph as a mermaid flowchart, one box per layer, arrows from importer to imported."""
    lines = ["```mermaid", "flowchart TB"]
    for name, members in reversed(LAYERS):  # the top layer first, as drawn
        lines.append(f"    subgraph {name}")
        lines += [f'        {_node(m)}["{_label(m)}"]' for m in members if m in units]
        lines.append("    end")
    lines += [f"    {_node(a)} --> {_node(b)}" for a in sorted(units) for b in sorted(units[a])]
    lines.append("```")
    return "\n".join(lines)


def dot(units: Graph) -> str:
    """The unit graph for Graphviz, one cluster per layer, arrows from importer to imported."""
    lines = ["digraph engram {", "    rankdir=TB;", "    node [shape=box];"]
    for i, (name, members) in reversed(list(enumerate(LAYERS))):
        lines.append(f'    subgraph cluster_{i} {{ label="{name}"; '
                     + " ".join(f'{_node(m)} [label="{_label(m)}"];' for m in members if m in units) + " }")
    lines += [f"    {_node(a)} -> {_node(b)};" for a in sorted(units) for b in sorted(units[a])]
    lines.append("}")
    return "\n".join(lines)


def problems(graph: Graph) -> list[str]:
    """Every module cycle, unit cycle and layer violation of ``graph``, one line each."""
    found = []
    for kind, edges in (("module", graph), ("package", unit_graph(graph))):
        found += [f"{kind} cycle: {' -> '.join(cycle_in(edges, component))} (strongly connected: "
                  f"{', '.join(component)})" for component in cycles(edges)]
    return found + [f"layer order: {problem}" for problem in layer_violations(graph)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--mermaid", action="store_true", help="print the package graph as a mermaid block")
    form.add_argument("--dot", action="store_true", help="print the package graph for Graphviz")
    parser.add_argument("--all-edges", action="store_true",
                        help="draw every import between packages, also those a path of others implies")
    args = parser.parse_args(argv)
    graph = module_graph()
    if args.mermaid or args.dot:
        units = unit_graph(graph)
        print((mermaid if args.mermaid else dot)(units if args.all_edges else reduced(units)))
        return 0
    found = problems(graph)
    print("\n".join(found) if found else f"{len(graph)} modules: no cycles, layer order kept")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
