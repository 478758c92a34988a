"""Imports flow one way: no cycle in ``splitllama/``, and the lower layers (config, weight map,
checkpoint, models, assembly) import neither training nor a backend (``scripts/import_graph.py``)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_package_imports_have_no_cycle() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 cycles, 0 lower-layer imports" in proc.stdout
