"""Import graph of the ``splitllama`` package: print its cycles, exit non-zero if there is one.

Reads the source with :mod:`ast` (imports nothing): every ``import``/``from`` statement of a module,
module-level or inside a function, is an edge from that module to the ``splitllama`` module it
names (``from .x import y`` counts as an edge to ``x.y`` when that is a module, else to ``x``).
Layering rules (lower layers never import training or backends) are checked with ``--layers``.

    python scripts/import_graph.py            # cycles (strongly connected components)
    python scripts/import_graph.py --edges    # the graph itself
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "splitllama"

#: modules of the lower layers and the prefixes they must never import
LOWER = ("splitllama.configuration_split_llama", "splitllama.weight_map", "splitllama.checkpoint",
         "splitllama.modeling_split_llama", "splitllama.assembly")
UPPER = ("splitllama.training", "splitllama.megatron", "splitllama.vllm")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" for a in node.names]  # a name that is no module resolves to stem
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                r = _resolve(t, mods)
                if r and r != mod:
                    edges[mod].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m in sorted(edges) if m.startswith(LOWER)
            for t in sorted(edges[m]) if t.startswith(UPPER)]


def main(argv: list[str]) -> int:
    edges = graph()
    if "--edges" in argv:
        for m in sorted(edges):
            print(m, "->", ", ".join(sorted(edges[m])))
    found = cycles(edges)
    bad = layer_violations(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    for line in bad:
        print("layering:", line)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycles, "
          f"{len(bad)} lower-layer imports of training or a backend")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
