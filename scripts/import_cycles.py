"""Count import cycles between the modules of a package (grimp's import graph).

    python scripts/import_cycles.py [package] [--src DIR]

Prints each strongly connected group of modules (modules that import each other, directly
or through others), its size, and a summary line. Imports under ``if TYPE_CHECKING:`` are
counted too (they are cycles for a reader and for type checkers). Uses ``grimp`` (installed
with import-linter, in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys

import grimp


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Tarjan's algorithm over ``modules``: the groups of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="equimodal")
    parser.add_argument("--src", default=None, help="folder to put first on sys.path")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    graph = grimp.build_graph(args.package, cache_dir=None)
    # the root package's __init__ is not a module anyone imports for its contents
    modules = {m for m in graph.modules if m != args.package}
    groups = strongly_connected(graph, modules)
    for group in sorted(groups, key=len, reverse=True):
        print(f"cycle of {len(group)} modules: {', '.join(group)}")
    in_cycles = sum(len(g) for g in groups)
    print(
        f"{args.package}: {len(modules)} modules, {len(groups)} import cycle(s), "
        f"{in_cycles} modules in cycles"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
