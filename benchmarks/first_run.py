"""Benchmark: the first ``python run.py`` from an empty cache, then the same command cached.

A new user's first command builds the embedded donors (corpus, tokenizer, pre-training of both
donors) and then trains the adapter; every later run reuses the cached donors. This times both,
each as a fresh ``run.py`` process exactly as a user calls it (wall clock, imports included), and
breaks each down from what the run itself records: the donor build's own timings (from the cache
manifest) and the run's phases (``timings`` in ``results.json``).

Targets (issue 12, 2 idle cores): first run <= 300 s, cached run <= 60 s.

    python benchmarks/first_run.py                          # empty temporary cache, then cached
    python benchmarks/first_run.py --cache-dir /tmp/c --cached-only   # only the cached run (donors in /tmp/c)
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
TARGETS_S = {"first": 300.0, "cached": 60.0}


def timed_run(name: str, cache_dir: Path, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``run.py`` process with ``SPLITLLAMA_CACHE=cache_dir``; wall time and its recorded phases."""
    env = {**os.environ, "SPLITLLAMA_CACHE": str(cache_dir), "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO / "run.py"), f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if not args.cached_only:
        rows.append(timed_run("first", cache_dir, workdir / "first", args.overrides))
    rows.append(timed_run("cached", cache_dir, workdir / "cached", args.overrides))

    print(f"\n{'run':8} {'wall s':>8} {'target s':>9}  phases (s)")
    for row in rows:
        phases = {**row["donor_build_s"], **row["phases_s"]}
        print(f"{row['name']:8} {row['wall_s']:8.1f} {row['target_s']:9.0f}  " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    losses = rows[-1]["donor_val_loss"]
    print(f"\ndonors on the run's validation blocks: small {losses['small']}, large {losses['large']}; split {rows[-1]['val_loss']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": args.note, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(), "runs": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
