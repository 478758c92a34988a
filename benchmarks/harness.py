"""Benchmark: what downstream evaluation (``eval.harness``) adds to a cached default run.

Runs ``python run.py`` as a user does, each in a fresh process, with one donor cache:

1. a warm-up run with the default config (builds the embedded donors and our task data if the
   cache lacks them, and scores the donors once: the cached references);
2. ``eval.harness.tasks=[]``: the default run without downstream evaluation;
3. the default run (our two offline tasks, every item, references from the cache).

Rows 2 and 3 are repeated ``--repeats`` times. ``--random-donors DIR`` skips the embedded
donors' pre-training (tens of minutes on a loaded 2-core machine): it saves randomly initialised
donors of the embedded recipe's shapes, with the recipe's tokenizer trained on the same corpus,
and passes them as ``donors.path8b`` / ``donors.path70b``; the run is otherwise the default one
(same layers, adapter, data, steps), so its wall time is that of a cached default run. Target: row 3's wall time at most 1.2x row 2's.
Wall time is the process's (imports included); ``harness_s`` is results.json's timing of the
scoring itself (lm-eval's requests over the split model, batched).

    python benchmarks/harness.py                       # ~/.cache/splitllama (or $SPLITLLAMA_CACHE)
    python benchmarks/harness.py --cache /tmp/cache --repeats 2
    python benchmarks/harness.py --random-donors /tmp/random-donors   # same shapes and steps, no pre-training
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], cache: Path, workdir: Path, name: str) -> dict:
    run_dir = workdir / name
    env = {**os.environ, "SPLITLLAMA_CACHE": str(cache), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *overrides, "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={run_dir}"], cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    timings = results["timings"]
    return {"name": name, "overrides": overrides, "wall_s": round(wall, 2), "total_s": timings["total_s"],
            "harness_s": timings.get("harness_s"), "harness_references_s": timings.get("harness_references_s"),
            "harness": results["metrics"].get("harness"), "references": (results.get("references") or {}).get("harness"),
            "val_loss": results["metrics"]["val_loss"]}


def random_donors(out: Path, cache: Path) -> list[str]:
    """Donors of the embedded recipe's shapes with random weights and the recipe's tokenizer."""
    sys.path.insert(0, str(REPO))
    from splitllama.data import split_documents
    from splitllama.embedded import EmbeddedRecipe, load_stdlib_corpus, train_tokenizer
    from tests.donors import make_random_donor

    recipe = EmbeddedRecipe()
    paths = {"small": out / "small", "large": out / "large"}
    if not all((p / "config.json").is_file() for p in paths.values()):
        train_docs, _ = split_documents(load_stdlib_corpus(cache, recipe.min_doc_chars, corpus=recipe.corpus, progress=False),
                                        recipe.val_fraction)
        tokenizer = train_tokenizer(train_docs, recipe.vocab_size, progress=False)
        for seed, (which, path) in enumerate(paths.items()):
            make_random_donor(path, recipe.llama_config(which), seed=seed)
            tokenizer.save_pretrained(path)
    return [f"donors.path8b={paths['small']}", f"donors.path70b={paths['large']}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("SPLITLLAMA_CACHE", "~/.cache/splitllama")).expanduser())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random-donors", type=Path, default=None, help="save random donors of the recipe's shapes here and use them")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "harness.json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    donors = random_donors(args.random_donors, args.cache) if args.random_donors else []
    warm = run(donors, args.cache, workdir, "warmup")
    rows = {"off": [], "on": []}
    for i in range(args.repeats):
        rows["off"].append(run([*donors, "eval.harness.tasks=[]"], args.cache, workdir, f"off{i}"))
        rows["on"].append(run(donors, args.cache, workdir, f"on{i}"))
    off = statistics.median(r["wall_s"] for r in rows["off"])
    on = statistics.median(r["wall_s"] for r in rows["on"])
    harness = statistics.median(r["harness_s"] for r in rows["on"])
    print(f"{'run':<42} {'wall s (median)':>16} {'harness_s':>10} {'x off':>7}")
    print(f"{'default, eval.harness.tasks=[]':<42} {off:>16.1f} {'':>10} {1.0:>7.2f}")
    print(f"{'default (our 2 tasks, all items, refs cached)':<42} {on:>16.1f} {harness:>10.1f} {on / off:>7.2f}")
    print(f"warm-up (donor references scored): harness_s {warm['harness_s']}, harness_references_s {warm['harness_references_s']}")
    print(f"target: <= 1.20x -> {'met' if on / off <= 1.2 else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
                                    "donors": "random, embedded recipe's shapes" if donors else "embedded (cached)",
                                    "load_avg_at_end": os.getloadavg(), "off_wall_s": off, "on_wall_s": on,
                                    "harness_s": harness, "ratio": on / off, "warmup": warm, "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
