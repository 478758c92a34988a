"""Benchmark: the README's first command on a new machine: install, then ``python run.py`` from an
empty cache, then the same command cached.

The default donors ship with the package, so a first run builds nothing; it tokenises the stdlib
corpus, scores both donors on its validation blocks and downstream tasks (cached for later runs) and
trains the split. This times each step as a user runs it (wall clock, imports included) and breaks
each run down from what it records (``timings`` in ``results.json``). With ``--clone`` the runs use a
fresh clone of this repository installed by its own ``bash scripts/setup.sh`` (timed too).

Targets (issue 22, 2 idle cores): setup + first run <= 300 s; first run <= 90 s and cached <= 60 s,
unless the split needs longer to land between its donors, which wins within 180 s.

    python benchmarks/first_run.py --clone                  # fresh clone: setup, first run, cached run
    python benchmarks/first_run.py                          # this checkout: empty temporary cache, then cached
    python benchmarks/first_run.py --cache-dir /tmp/c --cached-only   # only the cached run
    python benchmarks/first_run.py --overrides adapter=mlp  # any run.py overrides for both runs

Prints a table and writes ``benchmarks/results/first_run.json``. Numbers depend on how idle the
cores are; ``--note`` records the conditions with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS_S = {"setup": 300.0, "first": 90.0, "cached": 60.0}


def timed_setup(clone: Path) -> dict[str, Any]:
    """``git clone`` of this repository and its own ``bash scripts/setup.sh`` (the plain install), timed."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (clone.parent / "setup.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"setup.sh failed (exit {proc.returncode}); log: {clone.parent / 'setup.log'}")
    return {"name": "setup", "wall_s": round(wall, 2), "target_s": TARGETS_S["setup"], "command": "bash scripts/setup.sh"}


def timed_run(name: str, cache_dir: Path, run_dir: Path, overrides: list[str], repo: Path = REPO,
              python: str = sys.executable) -> dict[str, Any]:
    """One ``run.py`` process with ``SPLITLLAMA_CACHE=cache_dir``; wall time and its recorded phases."""
    env = {**os.environ, "SPLITLLAMA_CACHE": str(cache_dir), "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    command = [python, str(repo / "run.py"), f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (run_dir.parent / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed (exit {proc.returncode}); log: {run_dir.parent / f'{name}.log'}\n{proc.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    donors = results.get("donors") or {}
    build = ((donors.get("embedded_metrics") or {}).get("timings") or {}) if donors.get("built_now") else {}
    metrics = results.get("metrics") or {}
    return {
        "name": name, "wall_s": round(wall, 2), "target_s": TARGETS_S[name], "command": " ".join(command[1:]),
        "built_donors": bool(donors.get("built_now")),
        "phases_s": {k: round(v, 2) for k, v in (results.get("timings") or {}).items()},
        "donor_build_s": {k: round(v, 2) for k, v in build.items()},
        "val_loss": metrics.get("val_loss"), "gap_closed": metrics.get("gap_closed"),
        "donor_val_loss": {w: (results.get("references") or {}).get(w, {}).get("val_loss") for w in ("small", "large")},
        "embedded_val_loss": {w: (donors.get("embedded_metrics") or {}).get(f"{w}_val_loss") for w in ("small", "large")},
        "last_line": next((line.split("] - ", 1)[-1] for line in reversed(proc.stderr.splitlines() + proc.stdout.splitlines())
                           if "validation loss: small donor" in line), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clone", action="store_true", help="a fresh clone installed by its own scripts/setup.sh (timed)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="splitllama cache to use (default: a new empty one)")
    parser.add_argument("--cached-only", action="store_true", help="skip the first run (the cache must hold the donors)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--overrides", nargs="*", default=[], help="run.py overrides for both runs")
    parser.add_argument("--note", default="", help="conditions of the measurement (idle or shared cores, ...)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "first_run.json")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="splitllama-first-run-"))
    cache_dir = args.cache_dir or workdir / "cache"
    if not args.cached_only and cache_dir.exists() and any(cache_dir.iterdir()):
        raise SystemExit(f"--cache-dir {cache_dir} is not empty: a first run needs an empty cache (or pass --cached-only)")
    rows = []
    repo, python = REPO, sys.executable
    if args.clone:
        repo = workdir / "clone"
        rows.append(timed_setup(repo))
        python = str(repo / ".venv" / "bin" / "python")
    if not args.cached_only:
        rows.append(timed_run("first", cache_dir, workdir / "first", args.overrides, repo, python))
    rows.append(timed_run("cached", cache_dir, workdir / "cached", args.overrides, repo, python))

    print(f"\n{'run':8} {'wall s':>8} {'target s':>9}  phases (s)")
    for row in rows:
        phases = {**row.get("donor_build_s", {}), **row.get("phases_s", {})}
        print(f"{row['name']:8} {row['wall_s']:8.1f} {row['target_s']:9.0f}  " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    losses = rows[-1]["donor_val_loss"]
    print(f"\ndonors on the run's validation blocks: small {losses['small']}, large {losses['large']}; split {rows[-1]['val_loss']}")
    print(f"last line: {rows[-1]['last_line']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": args.note, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(), "runs": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
