"""Benchmark: embedded-donor recipes compared by the loss each donor reaches and what it costs.

The default experiment needs the large embedded donor clearly better than the small one (issue 12:
at least 0.5 nats lower validation loss), both trained on the same corpus and tokenizer, within a
first run that stays short. Which recipe gets there is measured, not assumed: this builds each
candidate with the real build (:func:`splitllama.embedded.build_embedded_donors`: corpus,
tokenizer, pre-training, scoring on the validation blocks) into a scratch directory and reports
both donors' final validation loss, the gap, the loss-vs-steps curves (``eval_every``) and the
pre-training seconds.

    python benchmarks/donor_recipes.py                        # every candidate below (CPU: long)
    python benchmarks/donor_recipes.py --only tiny_yaml old_0685c8d
    python benchmarks/donor_recipes.py --set large.pretrain_steps=600 --set large.lr=3e-3   # one ad-hoc recipe
    python benchmarks/donor_recipes.py --scale-steps 0.05 --only tiny_yaml   # a smoke run

A candidate is conf/donors/tiny.yaml's recipe with dotted overrides. On a GPU the losses per step
are those of the CPU build (same recipe, same seeds) within numerical noise, so the curves can be
measured there in seconds; the CPU time of a recipe is its steps x tokens per step / the CPU's
tokens/s (``--cpu-tokens-per-s`` gives the measured rates of this machine).
Prints a table and writes ``benchmarks/results/donor_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitllama.embedded import EmbeddedRecipe, build_embedded_donors, default_cache_dir  # noqa: E402

#: name -> dotted overrides of conf/donors/tiny.yaml's ``embedded`` recipe
CANDIDATES: dict[str, list[str]] = {
    "tiny_yaml": [],
    # the recipe before issue 12 (small 5.35, large 6.09 on 2026-11-30)
    "old_0685c8d": ["corpus=stdlib_docstrings", "vocab_size=8192", "seq_len=256", "eval_every=null",
                    "small.hidden_size=128", "small.num_layers=4", "small.num_heads=4", "small.num_kv_heads=2", "small.intermediate_size=448",
                    "small.pretrain_steps=200", "small.lr=3e-3", "small.warmup_steps=20",
                    "large.num_layers=8", "large.pretrain_steps=100", "large.lr=3e-3", "large.warmup_steps=10"],
    # the same recipe on the docstrings (1.6 MB): every size levels off near 4.0 and overfits
    "docstrings": ["corpus=stdlib_docstrings"],
    # a wider small donor (h64, 2 heads): a smaller gap (GPU grid, 1600 steps: 3.41 vs 3.13)
    "small_h64": ["small.hidden_size=64", "small.num_heads=2", "small.num_kv_heads=2", "small.intermediate_size=224", "small.lr=6e-3"],
    # a narrower large donor (h192, 6 heads): cheaper, a little worse (3.16)
    "large_h192": ["large.hidden_size=192", "large.num_heads=6", "large.intermediate_size=672", "large.lr=3e-3"],
    # half the steps (the gap was 0.1-0.2 at 800 steps for h64 vs h256)
    "steps_x0.5": ["small.pretrain_steps=@0.5", "small.warmup_steps=@0.5", "large.pretrain_steps=@0.5", "large.warmup_steps=@0.5"],
}


def tiny_recipe() -> dict[str, Any]:
    return yaml.safe_load((REPO / "conf" / "donors" / "tiny.yaml").read_text())["embedded"]


def _value(raw: str) -> Any:
    """An override's value: a number where it reads as one (YAML 1.1 takes ``3e-3`` for a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


def apply_overrides(recipe: dict[str, Any], overrides: list[str], scale_steps: float = 1.0) -> dict[str, Any]:
    """``key=value`` (dotted, YAML values) over ``recipe``; ``@f`` multiplies the current value by f."""
    recipe = json.loads(json.dumps(recipe))
    for override in overrides:
        key, _, raw = override.partition("=")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"{override}: {key} is not a field of the recipe (fields: {', '.join(node)})")
        node[leaf] = round(node[leaf] * float(raw[1:])) if raw.startswith("@") else _value(raw)
    for which in ("small", "large"):
        donor = recipe[which]
        donor["pretrain_steps"] = max(1, round(donor["pretrain_steps"] * scale_steps))
        if donor.get("warmup_steps") is not None:
            donor["warmup_steps"] = min(donor["pretrain_steps"], max(0, round(donor["warmup_steps"] * scale_steps)))
    if recipe.get("eval_every") and scale_steps != 1.0:
        recipe["eval_every"] = max(1, round(recipe["eval_every"] * scale_steps))
    return recipe


def measure(name: str, recipe: EmbeddedRecipe, cache_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"donor-recipe-{name}-") as scratch:
        start = time.perf_counter()
        metrics = build_embedded_donors(recipe, Path(scratch), cache_dir, progress=False)
        wall = time.perf_counter() - start
    small, large = metrics["small_val_loss"], metrics["large_val_loss"]
    return {
        "name": name, "recipe": asdict(recipe), "key": recipe.key(), "wall_s": round(wall, 1),
        "small_val_loss": round(small, 4), "large_val_loss": round(large, 4), "gap": round(small - large, 4),
        "timings_s": {k: round(v, 1) for k, v in metrics["timings"].items()},
        "tokens_per_s": {w: round(metrics[f"{w}_tokens_per_s"]) for w in ("small", "large")},
        "parameters": {w: metrics[f"{w}_parameters"] for w in ("small", "large")},
        "curves": {w: metrics.get(f"{w}_val_curve", []) for w in ("small", "large")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help=f"candidates to run (of: {', '.join(CANDIDATES)})")
    parser.add_argument("--set", action="append", default=[], help="an ad-hoc candidate: overrides of tiny.yaml (repeatable)")
    parser.add_argument("--scale-steps", type=float, default=1.0, help="multiply every step count (smoke runs)")
    parser.add_argument("--min-gap", type=float, default=0.5, help="the gap (small - large, nats) a recipe must reach")
    parser.add_argument("--cache-dir", type=Path, default=None, help="corpus cache (default: the splitllama cache)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "donor_recipes.json")
    args = parser.parse_args()

    candidates = {"adhoc": args.set} if args.set else CANDIDATES
    names = args.only or list(candidates)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: unknown candidate(s); known: {', '.join(candidates)}")
    base = tiny_recipe()
    recipes = {n: EmbeddedRecipe.from_dict(apply_overrides(base, candidates[n], args.scale_steps)) for n in names}
    cache_dir = args.cache_dir or default_cache_dir()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for name, recipe in recipes.items():
        rows.append(measure(name, recipe, cache_dir))
        row = rows[-1]
        print(f"{name}: small {row['small_val_loss']:.3f}, large {row['large_val_loss']:.3f}, gap {row['gap']:+.3f} "
              f"({row['timings_s']})", flush=True)

    header = f"{'candidate':18} {'small':>7} {'large':>7} {'gap':>7} {'ok':>3} {'small s':>8} {'large s':>8} {'small tok/s':>11} {'large tok/s':>11}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        t = row["timings_s"]
        print(f"{row['name']:18} {row['small_val_loss']:7.3f} {row['large_val_loss']:7.3f} {row['gap']:+7.3f} "
              f"{'yes' if row['gap'] >= args.min_gap else 'no':>3} {t['pretrain_small_s']:8.1f} {t['pretrain_large_s']:8.1f} "
              f"{row['tokens_per_s']['small']:11d} {row['tokens_per_s']['large']:11d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, "scale_steps": args.scale_steps,
                                    "min_gap": args.min_gap, "candidates": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
