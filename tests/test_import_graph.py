"""Imports flow down the floors (``scripts/import_graph.py``): no module imports a higher floor, no
cycle, no private name taken across top-level subpackages, every module on a floor.

The repository test runs the script; the others build small packages under ``tmp_path`` and check
each rule both ways (the clean package passes, the broken one fails with the exact line), so no
rule passes vacuously."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
ig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ig)

#: a small floor table for the synthetic packages
FLOORS = (
    ig.Floor("ground", "data", ("splitllama.low", "splitllama.util")),
    ig.Floor("model", "models", ("splitllama", "splitllama.mid", "splitllama.other")),
    ig.Floor("training", "training", ("splitllama.high",)),
    ig.Floor("entry", "entry points", ("run",)),
)


def build(root: Path, files: dict[str, str]) -> Path:
    """A package under ``root``: ``{relative path: source}``, plus an empty ``splitllama/__init__.py``."""
    for rel, src in {"splitllama/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    return root


def problems(root: Path) -> list[str]:
    return ig.check(root, FLOORS).problems


def test_repo_follows_the_floors() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py")], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (" 0 cycles, 0 upward imports, 0 private names across packages, 0 modules without a floor"
            in proc.stdout.splitlines()[-1]), proc.stdout


def test_floor_table_places_the_layout() -> None:
    """The real table: a package prefix covers its submodules, the package itself only its ``__init__``."""
    expect = {
        "splitllama.weight_map": "ground", "splitllama.data.packing": "ground", "splitllama._lazy": "ground",
        "splitllama": "model", "splitllama.backend.hf": "model", "splitllama.megatron.layers.spec": "model",
        "splitllama.embedded.build": "model", "splitllama.training.grpo": "training", "splitllama.harness": "training",
        "splitllama.run": "run", "splitllama.run.settings": "run", "splitllama.sweeps": "entry", "run": "entry",
        "splitllama.newthing": None, "splitllama.runner": None, "runner": None,
    }
    assert {m: ig.FLOORS[ig.floor_of(m)].name if ig.floor_of(m) is not None else None for m in expect} == expect
    assert [f.name for f in ig.FLOORS] == ["ground", "model", "training", "run", "entry"]
    assert all(f.doc and "\n" not in f.doc for f in ig.FLOORS)


@pytest.mark.parametrize("stmt", [
    "import splitllama.high",
    "from splitllama.high import f",
    "from splitllama import high",
    "from .high import f",
    "from . import high",
    "def g():\n    from .high import f\n",
])
def test_upward_import_fails(tmp_path: Path, stmt: str) -> None:
    root = build(tmp_path, {"splitllama/low.py": "x = 1\n", "splitllama/util.py": "u = 1\n",
                            "splitllama/high.py": "from splitllama.util import u\nf = u\n"})
    assert problems(root) == []  # downward is fine
    (root / "splitllama/low.py").write_text(stmt + "\n")
    assert problems(root) == ["upward: splitllama.low -> splitllama.high (floor ground -> training)"]


def test_upward_into_a_package_and_from_run_py(tmp_path: Path) -> None:
    """The package ``__init__`` is on floor model: a ground module importing it goes up; run.py (module
    ``run``, top floor) may import anything, and a subpackage's modules share its floor."""
    root = build(tmp_path, {
        "splitllama/util.py": "from splitllama import VERSION\n",
        "splitllama/high/__init__.py": "", "splitllama/high/step.py": "from splitllama.mid import m\n",
        "splitllama/mid.py": "m = 1\n",
        "run.py": "import splitllama\nfrom splitllama.high.step import m\n",
    })
    assert problems(root) == ["upward: splitllama.util -> splitllama (floor ground -> model)"]
    (root / "splitllama/mid.py").write_text("from splitllama.high import step\n")
    assert "upward: splitllama.mid -> splitllama.high.step (floor model -> training)" in problems(root)


def test_cycle_fails(tmp_path: Path) -> None:
    root = build(tmp_path, {"splitllama/mid.py": "from splitllama.other import o\nm = 1\n", "splitllama/other.py": "o = 1\n"})
    assert problems(root) == []
    (root / "splitllama/other.py").write_text("def g():\n    from .mid import m\no = 1\n")  # inside a function counts too
    assert problems(root) == ["cycle: splitllama.mid <-> splitllama.other"]


@pytest.mark.parametrize(("importer", "stmt", "bad"), [
    # across top-level subpackages or single-file modules: an error
    ("splitllama/mid.py", "from splitllama.other import _hidden", "splitllama.other"),
    ("splitllama/mid.py", "from .other import _hidden as h", "splitllama.other"),
    ("splitllama/mid.py", "from splitllama.high.b import _hidden", "splitllama.high.b"),
    ("splitllama/mid.py", "from splitllama.high import _hidden", "splitllama.high"),
    ("splitllama/high/a.py", "from splitllama.other import _hidden", "splitllama.other"),
    ("splitllama/high/a.py", "def f():\n    from ...splitllama.other import _hidden", None),  # beyond the root: not ours
    ("splitllama/__init__.py", "from .other import _hidden", "splitllama.other"),
    ("run.py", "from splitllama.other import _hidden", "splitllama.other"),
    # within one subpackage, a dunder, a public name, a private module: fine
    ("splitllama/high/a.py", "from splitllama.high.b import _hidden", None),
    ("splitllama/high/a.py", "from .b import _hidden", None),
    ("splitllama/high/b.py", "from . import _hidden", None),
    ("splitllama/high/__init__.py", "from .b import _hidden", None),
    ("splitllama/mid.py", "from splitllama.other import __version__", None),
    ("splitllama/mid.py", "from splitllama.other import shown", None),
    ("splitllama/mid.py", "from splitllama.high import _private_mod", None),
    ("splitllama/mid.py", "import splitllama.high._private_mod", None),
    ("splitllama/__init__.py", "from .util import shown", None),
])
def test_private_name_across_packages_fails(tmp_path: Path, importer: str, stmt: str, bad: str | None) -> None:
    one_floor = (ig.Floor("all", "everything", ("splitllama", "splitllama.mid", "splitllama.other", "splitllama.util",
                                               "splitllama.high", "run")),)
    root = build(tmp_path, {
        "splitllama/other.py": "_hidden = shown = __version__ = 1\n", "splitllama/util.py": "shown = 1\n",
        "splitllama/mid.py": "", "splitllama/high/__init__.py": "_hidden = 1\n", "splitllama/high/a.py": "",
        "splitllama/high/b.py": "_hidden = 1\n", "splitllama/high/_private_mod.py": "", "run.py": ""})
    assert ig.check(root, one_floor).problems == []
    path = root / importer
    path.write_text(path.read_text() + stmt + "\n")
    found = ig.check(root, one_floor).problems
    if bad is None:
        assert found == []
    else:
        mod = next(m for m, p in ig.modules(root).items() if p == path)
        name = stmt.split(" import ")[1].split()[0]
        line = len(path.read_text().splitlines())
        assert found == [f"private name: {mod} imports {name} from {bad} ({importer}:{line})"]


def test_module_without_a_floor_fails(tmp_path: Path) -> None:
    root = build(tmp_path, {"splitllama/mid.py": "", "splitllama/high/__init__.py": "", "splitllama/high/deep/x.py": ""})
    assert problems(root) == []  # a package prefix covers its submodules at any depth
    (root / "splitllama/stray.py").write_text("")  # the package's own prefix covers only its __init__
    (root / "splitllama/highway.py").write_text("")  # a prefix is a module name, not a string prefix
    assert problems(root) == ["no floor: splitllama.highway", "no floor: splitllama.stray"]


def test_alias_module_may_import_upward_and_private(tmp_path: Path) -> None:
    """A "Moved to" docstring exempts a module from the floor and private-name rules, not from cycles,
    and a module importing the alias is still checked against the alias's floor."""
    moved = '"""Moved to :mod:`splitllama.high`; this alias keeps old imports working."""\nfrom splitllama.high import f, _g\n'
    root = build(tmp_path, {"splitllama/high.py": "f = _g = 1\n", "splitllama/low.py": moved.replace('"""Moved to', '"""Now at')})
    assert problems(root) == ["upward: splitllama.low -> splitllama.high (floor ground -> training)",
                              "private name: splitllama.low imports _g from splitllama.high (splitllama/low.py:2)"]
    (root / "splitllama/low.py").write_text(moved)
    assert problems(root) == []
    assert ig.is_alias(root / "splitllama/low.py")
    (root / "splitllama/high.py").write_text("from splitllama.low import f as _f\nf = _g = 1\n")
    assert problems(root) == ["cycle: splitllama.high <-> splitllama.low"]
    (root / "splitllama/high.py").write_text("f = _g = 1\n")
    (root / "splitllama/util.py").write_text("from splitllama.low import f\n")  # a ground module using a ground alias: fine
    assert problems(root) == []
    (root / "splitllama/mid.py").write_text('"""Moved to :mod:`splitllama.high`."""\nfrom splitllama.high import f\n')
    (root / "splitllama/util.py").write_text("from splitllama.mid import f\n")  # the alias is on floor model
    assert problems(root) == ["upward: splitllama.util -> splitllama.mid (floor ground -> model)"]


def test_main_prints_problems_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build(tmp_path, {"splitllama/low.py": "x = 1\n", "splitllama/high.py": "from splitllama.low import x\n"})
    assert ig.main([], root, FLOORS) == 0
    assert capsys.readouterr().out == ("3 modules, 1 imports, 0 cycles, 0 upward imports, 0 private names across packages, "
                                       "0 modules without a floor\n")
    (root / "splitllama/low.py").write_text("from splitllama.high import x\nfrom splitllama.mid import _m\n")
    (root / "splitllama/mid.py").write_text("_m = 1\n")
    (root / "splitllama/lost.py").write_text("")
    assert ig.main([], root, FLOORS) == 1
    assert capsys.readouterr().out.splitlines() == [
        "upward: splitllama.low -> splitllama.high (floor ground -> training)",
        "upward: splitllama.low -> splitllama.mid (floor ground -> model)",
        "cycle: splitllama.high <-> splitllama.low",
        "private name: splitllama.low imports _m from splitllama.mid (splitllama/low.py:2)",
        "no floor: splitllama.lost",
        "5 modules, 3 imports, 1 cycles, 2 upward imports, 1 private names across packages, 1 modules without a floor",
    ]
    assert ig.main(["--bogus"], root, FLOORS) == 2


def test_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Floors with line counts, the largest files, cross-floor counts, and run.py's names traced to
    where they are defined (through an alias's re-export, a lazy ``__getattr__`` table and ``moved_names``)."""
    root = build(tmp_path, {
        "splitllama/__init__.py": "from ._lazy import lazy_getattr\n__getattr__ = lazy_getattr(__name__, {'build': 'mid'})\n",
        "splitllama/_lazy.py": "def lazy_getattr(p, t):\n    pass\n",
        "splitllama/low.py": "def helper():\n    pass\n",
        "splitllama/mid.py": "from .low import helper\n\n\ndef build():\n    pass\n",
        "splitllama/high/__init__.py": "",
        "splitllama/high/old.py": '"""Moved to :mod:`splitllama.low`."""\nfrom splitllama.low import helper\n',
        "splitllama/high/older.py": '"""Moved to :mod:`splitllama.mid`."""\nfrom .._lazy import moved_names\n\n'
                                    '__getattr__ = moved_names(__name__, [f"splitllama.{m}" for m in ("low", "mid")])\n',
        "run.py": "import splitllama\nfrom splitllama.high import old as O\nfrom splitllama.mid import build\n\n"
                  "O.helper()\nsplitllama.build()\nsplitllama.high.old.helper()\nfrom splitllama.high.older import build as b2\n",
    })
    floors = (ig.Floor("ground", "data", ("splitllama.low", "splitllama._lazy")), *FLOORS[1:])
    assert ig.main(["--report"], root, floors) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "floor 0 ground: data (2 modules, 4 lines)"
    assert "       2  splitllama.high.old  (alias)" in out
    assert out[out.index("largest files:") + 1] == "       8  run.py"
    start = next(i for i, line in enumerate(out) if line.startswith("run.py: "))
    assert out[out.index("imports across floors (module pairs):") + 1: start] == [
        "     model -> ground      2", "  training -> ground      2", "     entry -> model       2", "     entry -> training    2"]
    names = out[start + 1:-1]
    assert names == [
        "  build                        <- splitllama [model]  defined in splitllama.mid  (line 6)",
        "  build                        <- splitllama.high.older [training, alias]  defined in splitllama.mid  (line 8)",
        "  build                        <- splitllama.mid [model]  (line 3)",
        "  helper                       <- splitllama.high.old [training, alias]  defined in splitllama.low  (lines 5, 7)",
    ]
    assert out[-1].startswith("8 modules, 8 imports, 0 cycles, ")
