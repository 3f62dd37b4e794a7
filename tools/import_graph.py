"""The converter package's import graph: each module's imports inside the package, and any circle.

Run:
    python tools/import_graph.py            # converters/ (installed as moub_converters)
    python tools/import_graph.py DIR NAME   # another package folder and its import name

Reads the source (nothing is imported), so it sees imports inside functions too: a circle
closed by a deferred import is still a circle. Importing ``pkg.sub.mod`` runs ``pkg.sub``'s
``__init__`` first, so it counts as an import of ``pkg.sub`` as well, unless ``pkg.sub`` holds
the importing module (its packages are initialised before it runs). Exits 1 if there is a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(folder: Path, package: str) -> dict[str, Path]:
    """Module name (``package.sub.mod``; a package by its own name) -> source file."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import ``from <level dots><target> import ...`` in ``module``."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, known: set[str], package: str) -> set[str]:
    """The package's modules that ``module`` imports (anywhere in its source), with their parents."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if submodule in known else base)
    ancestors = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 1)}
    found = {name for name in names if name in known}  # what it names, its own packages included
    for name in names:
        parts = name.split(".")
        for end in range(2, len(parts)):  # the sub-packages run on the way, unless already running
            prefix = ".".join(parts[:end])
            if prefix in known and prefix not in ancestors:
                found.add(prefix)
    found.discard(module)
    return found


def graph(folder: Path, package: str) -> dict[str, set[str]]:
    found = modules(folder, package)
    known = set(found)
    return {name: imports_of(name, path, known, package) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else ROOT / "converters"
    package = argv[1] if len(argv) > 1 else "moub_converters"
    edges = graph(folder, package)
    short = lambda name: name[len(package) + 1 :] or package  # noqa: E731
    width = max(len(short(n)) for n in edges)
    for name in sorted(edges):
        print(f"{short(name):{width}}  <- {', '.join(sorted(short(m) for m in edges[name])) or '-'}")
    cycle = find_cycle(edges)
    if cycle:
        print(f"import circle: {' -> '.join(short(n) for n in cycle)}", file=sys.stderr)
        return 1
    print(f"{len(edges)} modules, no import circle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
