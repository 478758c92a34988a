"""Which split recipe beats its donors trained alike? A grid of ``run.py`` variants at the default budget.

Each variant is the project's own command (``python run.py <common> <variant>``), run side by side
(``--parallel``); the donors trained alike come from ``python -m splitllama.run.references <common>``
(the same budget, cached). The table gives each split's validation loss, both gaps and its training
FLOPs per token against the large donor's; JSON goes to ``--out``.

    python benchmarks/split_recipes.py --out benchmarks/results/split_recipes_<date> --parallel 4 \\
        -- data=files 'data.files=[corpus.jsonl]' eval.harness.tasks=[] parallel.accelerator=gpu

Everything after ``--`` is added to every command (on a GPU machine: the accelerator, and the run's
corpus as a file so the blocks match the CPU's whatever the Python version there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: name -> overrides of the default run (conf/config.yaml: linear adapter by least squares, finetune=last,
#: lm objective, 4 small + 3 large layers, lr = donors.default_lr); each keeps the budget (600 steps of 8 x 128)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "last_lr2e-3": ["optim.lr=2e-3"],
    "last_distill": ["objective=distill"],
    "last_mixed": ["objective=mixed"],
    "all_lr5e-4": ["finetune=all", "optim.lr=5e-4"],
    "all_lr1e-3": ["finetune=all", "optim.lr=1e-3"],
    "all_lr2e-3": ["finetune=all", "optim.lr=2e-3"],
    "all_lr3e-3": ["finetune=all", "optim.lr=3e-3"],
    "all_mixed_lr2e-3": ["finetune=all", "objective=mixed", "optim.lr=2e-3"],
    "all_n70_2_lr2e-3": ["finetune=all", "optim.lr=2e-3", "layers.n70=2"],
    "all_n70_1_lr2e-3": ["finetune=all", "optim.lr=2e-3", "layers.n70=1"],
    "all_n8_3_lr2e-3": ["finetune=all", "optim.lr=2e-3", "layers.n8=3"],
    "mlp_n70_8": ["adapter=mlp", "layers.n70=8"],
    "mlp_n70_8_all_lr1e-3": ["adapter=mlp", "layers.n70=8", "finetune=all", "optim.lr=1e-3"],
    "mixed_lr3e-3": ["objective=mixed", "optim.lr=3e-3"],
    "mixed_lr1e-2": ["objective=mixed", "optim.lr=1e-2"],
    "mixed_dw3": ["objective=mixed", "objective.distill_weight=3.0"],
    "mixed_T2": ["objective=mixed", "objective.temperature=2.0"],
    "mlp_mixed": ["adapter=mlp", "objective=mixed"],
    "mlp_last": ["adapter=mlp"],
    "mixed_all_lr3e-4": ["finetune=all", "objective=mixed", "optim.lr=3e-4"],
    "all_lr3e-4": ["finetune=all", "optim.lr=3e-4"],
}


def run(command: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    return code, round(time.perf_counter() - start, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("common", nargs="*", help="overrides for every command (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    refs_cmd = [sys.executable, "-m", "splitllama.run.references", *args.common]
    jobs = {"references": (refs_cmd, args.out / "references.log")}
    for name in names:
        jobs[name] = ([sys.executable, "run.py", *args.common, *VARIANTS[name], "eval.tuned_references=false", "logger=csv",
                       "task.export=false", f"hydra.run.dir={args.out / name}"], args.out / f"{name}.log")
    with ThreadPoolExecutor(args.parallel) as pool:
        done = dict(zip(jobs, pool.map(lambda job: run(*job), jobs.values())))
    refs_text = (args.out / "references.log").read_text()
    refs = json.loads(refs_text[refs_text.index("{"): refs_text.rindex("}") + 1]) if "{" in refs_text else {}
    small_t, large_t = (refs.get(k, {}).get("val_loss") for k in ("small_tuned", "large_tuned"))
    rows = []
    for name in names:
        path = args.out / name / "results.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        m, r = record.get("metrics", {}), record.get("references", {})
        loss = m.get("val_loss")
        tuned_gap = (small_t - loss) / (small_t - large_t) if None not in (loss, small_t, large_t) else None
        rows.append({"name": name, "overrides": VARIANTS[name], "status": record.get("status"), "exit": done[name][0],
                     "seconds": done[name][1], "val_loss": loss, "val_loss_before": m.get("val_loss_before"),
                     "gap_closed": m.get("gap_closed"), "gap_closed_tuned": tuned_gap,
                     "small": r.get("small", {}).get("val_loss"), "large": r.get("large", {}).get("val_loss"),
                     "fraction_of_large_donor": record.get("flops", {}).get("fraction_of_large_donor")})
    summary = {"common": args.common, "references": refs, "references_exit": done["references"][0],
               "references_seconds": done["references"][1], "rows": rows}
    (args.out / "split_recipes.json").write_text(json.dumps(summary, indent=2))
    print(f"tuned references: small {small_t} large {large_t} ({done['references'][1]} s, exit {done['references'][0]})")
    print(f"{'variant':<22} {'val_loss':>9} {'gap':>7} {'gap_tuned':>9} {'FLOPs x':>8} {'s':>6}")
    for row in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{row['name']:<22} {fmt(row['val_loss'], '.4f'):>9} {fmt(row['gap_closed'], '+.3f'):>7} "
              f"{fmt(row['gap_closed_tuned'], '+.3f'):>9} {fmt(row['fraction_of_large_donor'], '.2f'):>8} {row['seconds']:>6}")
    return 0 if all(code == 0 for code, _ in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
