"""Import cycles among pst_ds's modules: an AST walk, imports inside functions included, those
under ``if TYPE_CHECKING:`` left out (they never run). Each cycle is a strongly connected set.

    python tools/import_cycles.py [PACKAGE_DIR]     prints each cycle; exit status 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder ``root``."""
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imported(module: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere but under TYPE_CHECKING."""
    tree = ast.parse(file.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            names += [f"{stem}.{alias.name}" for alias in node.names] + [stem]
    edges = set()
    for name in names:
        while name and name not in known:  # a name imported from a module: the module
            name = name.rpartition(".")[0]
        if name and name != module:
            edges.add(name)
    return edges


def cycles(root: Path) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm)."""
    known = modules(root)
    graph = {m: imported(m, f, known) for m, f in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pst_ds")
    found = cycles(root.resolve())
    for group in found:
        print(f"cycle of {len(group)} modules: {', '.join(group)}")
    print(f"{len(found)} import cycles in {root.name} ({len(modules(root.resolve()))} modules)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
