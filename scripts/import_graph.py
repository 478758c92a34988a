"""Import graph of the ``splitllama`` package and ``run.py``: the floors rule, cycles and private names.

Reads the source with :mod:`ast` (imports nothing, needs only the standard library): every
``import``/``from`` statement of a module, module-level or inside a function (``TYPE_CHECKING``
blocks included), is an edge from that module to the ``splitllama`` module it names
(``from .x import y`` counts as an edge to ``x.y`` when that is a module, else to ``x``).
``run.py`` at the repository root is in the graph as module ``run``. Imports spelled as strings
(``importlib.import_module("...")``, Hydra ``_target_``) are not seen.

The package is built in floors (:data:`FLOORS`): each module imports only from its own floor or a
lower one. Problems, one line each (exit status 1 when there is one):

    upward: A -> B (floor F -> G)              A imports B of a higher floor
    cycle: A <-> B <-> ...                     a strongly connected component of the graph
    private name: A imports _x from B (F:L)    ``from B import _x`` across top-level subpackages
    no floor: A                                A matches no prefix of FLOORS

An alias module (docstring starting with "Moved to") re-exports names that moved: it may import
upward and import private names, but its edges count for cycles.

    python scripts/import_graph.py            # the problems and a summary line
    python scripts/import_graph.py --report   # + floors with line counts, largest files, cross-floor edges, run.py's names
    python scripts/import_graph.py --edges    # + the graph itself
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "splitllama"
#: top-level script files (``<name>.py`` at the root) that are in the graph as module ``<name>``
SCRIPTS = ("run",)
#: how an alias module's docstring starts
ALIAS_MARK = "Moved to"


class Floor(NamedTuple):
    name: str
    doc: str
    #: module prefixes: a prefix covers itself and its submodules, except the package itself
    #: (``splitllama``), which covers only its ``__init__``
    prefixes: tuple[str, ...]


#: the floors, lowest first: a module may import from its own floor and the ones before it
FLOORS: tuple[Floor, ...] = (
    Floor("ground", "Plain data and files, no model: config, weight map, checkpoints, dtypes, errors, results, data.", (
        "splitllama.configuration_split_llama", "splitllama.weight_map", "splitllama.checkpoint",
        "splitllama.dtypes", "splitllama.errors", "splitllama.files", "splitllama.results",
        "splitllama._lazy", "splitllama.data")),
    Floor("model", "The split model and what builds, shards, serves or feeds it: assembly, backends, engines, donors.", (
        "splitllama", "splitllama.modeling_split_llama", "splitllama.assembly", "splitllama.flops",
        "splitllama.backend", "splitllama.megatron", "splitllama.vllm", "splitllama.verl",
        "splitllama.embedded", "splitllama.eval_tasks", "splitllama.references")),
    Floor("training", "Training a model: Lightning module, objectives, callbacks, data module, GRPO, the harness.", (
        "splitllama.training", "splitllama.harness")),
    Floor("run", "One experiment's steps, settings to downstream, and its config schema.", (
        "splitllama.run",)),
    Floor("entry", "What a user starts: analysis, sweeps and run.py.", (
        "splitllama.analysis", "splitllama.sweeps", "run")),
)


class Import(NamedTuple):
    """One imported name: ``from source import name`` (or ``import target``, then name is None)."""
    importer: str
    target: str  # the module the statement makes importer depend on
    source: str  # the module named after ``from`` (== target for ``import``)
    name: str | None
    asname: str | None
    line: int


# ---------------------------------------------------------------------------------------------- reading


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package (and the scripts in :data:`SCRIPTS` that exist) and its file."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for name in SCRIPTS:
        if (root / f"{name}.py").is_file():
            out[name] = root / f"{name}.py"
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


_TREES: dict[Path, tuple[str, ast.Module]] = {}


def _tree(path: Path) -> ast.Module:
    """The parsed file, parsed again only when its text changed (a timestamp may not, between quick writes)."""
    text = path.read_text()
    if path not in _TREES or _TREES[path][0] != text:
        _TREES[path] = (text, ast.parse(text, str(path)))
    return _TREES[path][1]


def _stem(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module ``from ... import`` names in module ``mod``; None beyond the top-level package."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level - 1 >= len(base):
        return None
    return ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of a ``splitllama`` module by a module of :func:`modules`, in file order."""
    mods = modules(root)
    out = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    r = _resolve(a.name, mods) if a.name.split(".")[0] == PACKAGE else None
                    if r:
                        out.append(Import(mod, r, r, None, a.asname, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                stem = _stem(mod, is_pkg, node)
                if stem is None or stem.split(".")[0] != PACKAGE:
                    continue
                source = _resolve(stem, mods)
                if source is None:
                    continue
                for a in node.names:
                    # a name that is no module resolves to the source
                    target = _resolve(f"{stem}.{a.name}", mods) if a.name != "*" else source
                    out.append(Import(mod, target, source, a.name, a.asname, node.lineno))
    out.sort(key=lambda i: (i.importer, i.line))
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: the modules it imports}`` (an import of itself, ``from . import x`` in x's package, is left out)."""
    edges: dict[str, set[str]] = {m: set() for m in modules(root)}
    for imp in imports(root):
        if imp.target != imp.importer:
            edges[imp.importer].add(imp.target)
    return edges


def is_alias(path: Path) -> bool:
    """A backward-compatibility alias: its docstring starts with :data:`ALIAS_MARK`."""
    doc = ast.get_docstring(_tree(path))
    return bool(doc and doc.startswith(ALIAS_MARK))


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


# ---------------------------------------------------------------------------------------------- rules


def _covers(prefix: str, mod: str) -> bool:
    if prefix == PACKAGE:
        return mod == PACKAGE
    return mod == prefix or mod.startswith(prefix + ".")


def floor_of(mod: str, floors: tuple[Floor, ...] = FLOORS) -> int | None:
    """The index of ``mod``'s floor (the longest prefix that covers it wins), None if it has none."""
    best: tuple[int, int] | None = None
    for i, floor in enumerate(floors):
        for p in floor.prefixes:
            if _covers(p, mod) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


def group(mod: str) -> str:
    """The top-level subpackage (or top-level single-file module) ``mod`` belongs to."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == PACKAGE else parts[0]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

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
    return sorted(out)


class Check(NamedTuple):
    edges: dict[str, set[str]]
    cycles: list[str]
    upward: list[str]
    private: list[str]
    unplaced: list[str]

    @property
    def problems(self) -> list[str]:
        return self.upward + self.cycles + self.private + self.unplaced

    def summary(self) -> str:
        return (f"{len(self.edges)} modules, {sum(map(len, self.edges.values()))} imports, {len(self.cycles)} cycles, "
                f"{len(self.upward)} upward imports, {len(self.private)} private names across packages, "
                f"{len(self.unplaced)} modules without a floor")


def check(root: Path = ROOT, floors: tuple[Floor, ...] = FLOORS) -> Check:
    """The graph under ``root`` checked against ``floors``; each problem is one line."""
    mods = modules(root)
    edges = graph(root)
    alias = {m for m, p in mods.items() if is_alias(p)}
    floor = {m: floor_of(m, floors) for m in mods}
    upward = []
    for m in sorted(edges):
        if m in alias or floor[m] is None:
            continue
        for t in sorted(edges[m]):
            if floor[t] is not None and floor[t] > floor[m]:
                upward.append(f"upward: {m} -> {t} (floor {floors[floor[m]].name} -> {floors[floor[t]].name})")
    private = []
    for imp in imports(root):
        if (imp.name and is_private(imp.name) and imp.target == imp.source  # a private module is fine
                and imp.importer not in alias and group(imp.source) != group(imp.importer)):
            where = f"{mods[imp.importer].relative_to(root).as_posix()}:{imp.line}"
            private.append(f"private name: {imp.importer} imports {imp.name} from {imp.source} ({where})")
    return Check(edges, [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)], upward, private,
                 [f"no floor: {m}" for m in sorted(mods) if floor[m] is None])


# ---------------------------------------------------------------------------------------------- report


def _string(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _strings(node: ast.AST | None) -> list[str]:
    """The strings a literal expression spells: ``"a"``, ``("a", "b")``, ``[f"p.{x}" for x in ("a", "b")]``."""
    if _string(node) is not None:
        return [_string(node)]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [s for e in node.elts for s in _strings(e)]
    if (isinstance(node, (ast.ListComp, ast.GeneratorExp)) and len(node.generators) == 1
            and isinstance(node.generators[0].target, ast.Name) and not node.generators[0].ifs):
        var = node.generators[0].target.id
        out = []
        for value in _strings(node.generators[0].iter):
            parts = node.elt.values if isinstance(node.elt, ast.JoinedStr) else [node.elt]
            text = [_string(p) if _string(p) is not None else value
                    if isinstance(p, ast.FormattedValue) and isinstance(p.value, ast.Name) and p.value.id == var
                    and p.conversion == -1 and p.format_spec is None else None for p in parts]
            if None in text:
                return []
            out.append("".join(text))
        return out
    return []


def home(mod: str, name: str, mods: dict[str, Path]) -> str:
    """Where ``mod.name`` is defined, following re-exports (``from x import name``, ``import *``, a
    ``lazy_getattr`` table and ``moved_names``/``moved_module`` with literal module names); ``mod``
    itself where the trail ends."""
    return _find(mod, name, mods, frozenset()) or mod


def _find(mod: str, name: str, mods: dict[str, Path], seen: frozenset[str]) -> str | None:
    if f"{mod}.{name}" in mods:
        return f"{mod}.{name}"
    if mod in seen or mod not in mods:
        return None
    seen = seen | {mod}
    path = mods[mod]
    is_pkg = path.name == "__init__.py"
    tables: dict[str, ast.expr] = {}
    getattr_call: ast.Call | None = None

    def stmts(body: list[ast.stmt]):
        for s in body:
            yield s
            if isinstance(s, ast.If):
                yield from stmts(s.body + s.orelse)
            elif isinstance(s, ast.Try):
                yield from stmts(s.body + s.orelse + s.finalbody + [x for h in s.handlers for x in h.body])

    for s in stmts(_tree(path).body):
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s.name == name:
            return mod
        if isinstance(s, (ast.Assign, ast.AnnAssign)):
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if name in names:
                return mod
            tables.update({n: s.value for n in names if s.value is not None})
            if "__getattr__" in names and isinstance(s.value, ast.Call):
                getattr_call = s.value
        if isinstance(s, ast.Import) and any((a.asname or a.name.partition(".")[0]) == name for a in s.names):
            return mod
        if isinstance(s, ast.ImportFrom):
            for a in s.names:
                if (a.asname or a.name) != name and a.name != "*":
                    continue
                stem = _stem(mod, is_pkg, s) or ""
                src = _resolve(stem, mods) if stem.split(".")[0] in (PACKAGE, *SCRIPTS) else None
                if a.name == "*":
                    found = _find(src, name, mods, seen) if src else None
                    if found:
                        return found
                    continue
                if src is None:
                    return f"{stem} (outside {PACKAGE})"
                return _find(src, a.name, mods, seen) or src
    if getattr_call is not None:
        fn = getattr_call.func.id if isinstance(getattr_call.func, ast.Name) else getattr(getattr_call.func, "attr", "")
        args = getattr_call.args
        if fn in ("moved_names", "moved_module") and len(args) >= 2:
            for new in _strings(args[1]):
                found = _find(new, name, mods, seen)
                if found:
                    return found
        if fn == "lazy_getattr" and len(args) >= 2:
            table = args[1] if isinstance(args[1], ast.Dict) else tables.get(getattr(args[1], "id", ""))
            if isinstance(table, ast.Dict):
                for k, v in zip(table.keys, table.values):
                    if _string(k) == name and _string(v):
                        sub = f"{mod if is_pkg else mod.rpartition('.')[0]}.{_string(v).lstrip('.')}"
                        return _find(sub, name, mods, seen) or sub
    return None


def script_names(script: str, root: Path = ROOT) -> list[tuple[str, str, str, list[int]]]:
    """``(name, the module it is imported from, where it is defined, lines)`` for every ``splitllama``
    name ``script`` imports; a module bound to a name (``import splitllama``, ``from x import mod as M``)
    stands for the attributes the script reads from it (``M.attr``)."""
    mods = modules(root)
    found: dict[tuple[str, str], list[int]] = {}
    bound: dict[str, set[str]] = {}  # a local name -> the modules it is bound to
    for imp in imports(root):
        if imp.importer != script:
            continue
        if imp.name is None:  # import a.b.c [as x]: x is a.b.c, else the name a is the package a
            bound.setdefault(imp.asname or PACKAGE, set()).add(imp.target if imp.asname else PACKAGE)
        elif imp.target != imp.source:  # from a import module
            bound.setdefault(imp.asname or imp.name, set()).add(imp.target)
        else:
            found.setdefault((imp.name, imp.source), []).append(imp.line)
    for node in ast.walk(_tree(mods[script])):
        chain: list[str] = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if not chain or not isinstance(node, ast.Name) or node.id not in bound:
            continue
        for m in bound[node.id]:
            for attr in chain:  # splitllama.training.pipeline.x: the name x of module splitllama.training.pipeline
                if f"{m}.{attr}" not in mods:
                    if not attr.startswith("__"):
                        found.setdefault((attr, m), []).append(node.lineno)
                    break
                m = f"{m}.{attr}"
    return sorted((n, m, home(m, n, mods), sorted(set(lines))) for (n, m), lines in found.items())


def report(root: Path = ROOT, floors: tuple[Floor, ...] = FLOORS, result: Check | None = None) -> list[str]:
    mods = modules(root)
    result = result or check(root, floors)
    lines = {m: line_count(p) for m, p in mods.items()}
    alias = {m for m, p in mods.items() if is_alias(p)}
    floor = {m: floor_of(m, floors) for m in mods}
    out = []
    for i, f in [*enumerate(floors), (None, None)]:
        members = sorted(m for m in mods if floor[m] == i)
        if f is None and not members:
            continue
        title = f"floor {i} {f.name}: {f.doc}" if f else "no floor:"
        out.append(f"{title} ({len(members)} modules, {sum(lines[m] for m in members)} lines)")
        out += [f"  {lines[m]:6d}  {m}{'  (alias)' if m in alias else ''}" for m in members]
    out.append("largest files:")
    out += [f"  {lines[m]:6d}  {mods[m].relative_to(root).as_posix()}"
            for m in sorted(mods, key=lambda m: (-lines[m], m))[:10]]
    pairs: Counter[tuple[int, int]] = Counter()
    by_alias: Counter[tuple[int, int]] = Counter()
    for m, targets in result.edges.items():
        for t in targets:
            if floor[m] is not None and floor[t] is not None and floor[m] != floor[t]:
                pairs[floor[m], floor[t]] += 1
                by_alias[floor[m], floor[t]] += m in alias
    out.append("imports across floors (module pairs):")
    for (a, b), n in sorted(pairs.items()):
        note = (f"  UPWARD ({by_alias[a, b]} from aliases)" if b > a else "")
        out.append(f"  {floors[a].name:>8} -> {floors[b].name:<8} {n:4d}{note}")
    for script in SCRIPTS:
        if script not in mods:
            continue
        out.append(f"{mods[script].name}: the {PACKAGE} names it imports (name <- module [floor], where it is defined)")
        for name, mod, where, at in script_names(script, root):
            f = floor_of(mod, floors)
            tags = [floors[f].name if f is not None else "no floor"] + (["alias"] if mod in alias else [])
            moved = f"  defined in {where}" if where != mod else ""
            out.append(f"  {name:<28} <- {mod} [{', '.join(tags)}]{moved}  (line{'s' if len(at) > 1 else ''} {', '.join(map(str, at))})")
    return out


def main(argv: list[str], root: Path = ROOT, floors: tuple[Floor, ...] = FLOORS) -> int:
    unknown = [a for a in argv if a not in ("--edges", "--report")]
    if unknown:
        print(f"unknown arguments {unknown}; usage: import_graph.py [--report] [--edges]", file=sys.stderr)
        return 2
    result = check(root, floors)
    if "--edges" in argv:
        for m in sorted(result.edges):
            print(m, "->", ", ".join(sorted(result.edges[m])))
    if "--report" in argv:
        print("\n".join(report(root, floors, result)))
    for line in result.problems:
        print(line)
    print(result.summary())
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
