"""Each measured number in the docs is tied to the file it comes from: a rerun that changes the file, or an edit
that changes the text, fails here until both say the same.

:data:`CHECKS` is the table: (doc file, pattern whose groups are printed numbers, what each number is, computed
from its source file). A printed number must equal its source at the printed precision (``2.947`` for
2.9471125). Whole tables are compared row by row: the stitch_grid table of experiments/README.md with
experiments/stitch_grid/summary.csv, the GRPO table of docs/rl.md with its results.json. The README's example
last line is what :func:`splitllama.results.outcome_line` prints for the default run's record.
The donor table of the README is tied by tests/test_shipped_donors.py; experiments/stitching_curve/ by its own
files (not here).

Bugs this was run against once: the README's last line with the small donor at 3.05 (the row says 3.0489), the
distillation recipe's FLOPs without its teacher (0.47x), experiments/README.md's "MLP beats linear at every
cell" after a rerun where linear wins, conf/experiment/optuna_layers.yaml naming a small donor of 2 layers.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

MANIFEST_FILE = REPO / "splitllama" / "donors" / "embedded" / "manifest.json"
RECIPES_FILE = REPO / "benchmarks" / "results" / "split_recipes_2026-12-07" / "split_recipes.json"
GRID_FILE = REPO / "experiments" / "stitch_grid" / "summary.csv"
GRPO_FILE = REPO / "benchmarks" / "results" / "grpo_2026-12-06" / "results.json"
TRAIN_STEP_FILE = REPO / "benchmarks" / "results" / "train_step.json"
FSDP_LOG = REPO / "benchmarks" / "results" / "gpu_2026-11-30" / "bench_fsdp2.log"

#: a distilling objective's teacher runs the large donor's forward on every token: a third of its training FLOPs
#: (forward + backward = 3 forwards, as splitllama.flops counts them)
TEACHER = 1 / 3


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@cache
def manifest() -> dict:
    return load(MANIFEST_FILE)


@cache
def recipes() -> dict:
    return load(RECIPES_FILE)


def recipe(*overrides: str) -> dict:
    """The split_recipes row run with exactly these overrides (``()`` is the default run)."""
    (row,) = [r for r in recipes()["rows"] if r["overrides"] == list(overrides)]
    return row


def fraction_with_teacher(row: dict) -> float:
    """Training FLOPs per token over the large donor's, the teacher's forward included (the rows were recorded before
    results.json counted it: their ``fraction_of_large_donor`` is the split's own)."""
    teacher = any(o in ("objective=distill", "objective=mixed") for o in row["overrides"])
    return row["fraction_of_large_donor"] + (TEACHER if teacher else 0.0)


@cache
def default_config():
    from tests.conftest import compose_run_config

    return compose_run_config()


@cache
def grid_rows() -> list[dict]:
    with GRID_FILE.open() as f:
        return list(csv.DictReader(f))


@cache
def grid_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "conf" / "experiment" / "stitch_grid.yaml").read_text())


def grid_sweep(key: str) -> list[int]:
    """The values the stitch_grid sweep takes for ``key`` (its Hydra sweeper's ``a,b`` list)."""
    return [int(v) for v in str(grid_config()["hydra"]["sweeper"]["params"][key]).split(",")]


def text_of(doc: str) -> str:
    """A doc's text with its line breaks and runs of spaces made single spaces (a number's sentence may wrap)."""
    return " ".join((REPO / doc).read_text().split())


def close(printed: str, value: float) -> bool:
    """``printed`` equals ``value`` at the printed precision (``+0.10`` for 0.1013; ``9.6`` for 9.62)."""
    text = printed.replace(",", "").rstrip("%x.")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-12


def fsdp_numbers() -> tuple[float, float, float]:
    """The FSDP2 row of the 2-GPU benchmark log: thousands of tokens/s, MFU %, peak GB per GPU."""
    tokens, mfu, peak = re.search(r"^split_hf_fsdp2\s+2\s+[\d.]+\s+(\d+)\s+([\d.]+)%\s+([\d.]+)", FSDP_LOG.read_text(), flags=re.M).groups()
    return float(tokens) / 1000, float(mfu), float(peak)


def metric(name: str) -> float:
    return manifest()["metrics"][name]


#: (doc, pattern with one group per number, the numbers' values from their source files, which file)
CHECKS: list[tuple[str, str, Callable[[], tuple[float, ...]], str]] = [
    # README: what the default run is
    ("README.md", r"builds the split \(all (\d+) layers of the small donor, a linear adapter fitted by least squares, the last (\d+) of "
                  r"the large donor's (\d+) layers\), trains the adapter and the \d+ large layers for (\d+) steps of (\d+) x (\d+) tokens at "
                  r"lr (\S+),",
     lambda: (manifest()["recipe"]["small"]["num_layers"], default_config().donors.default_n70, manifest()["recipe"]["large"]["num_layers"],
              default_config().trainer.max_steps, default_config().data.batch_size, default_config().data.seq_len, default_config().optim.lr),
     "manifest.json, conf/ (composed)"),
    ("README.md", r"the run's (\d+) validation blocks of (\d+) tokens",
     lambda: (default_config().data.max_val_blocks, default_config().data.seq_len), "conf/ (composed)"),
    ("README.md", r"at the best of (\w+) learning rates", lambda: (len(default_config().eval.tuned_lr_grid),), "conf/eval/default.yaml"),
    # README: the recipes grid, the distillation recipe, the design card's command
    ("README.md", r"Of the (\d+) recipes in `benchmarks/results/split_recipes_2026-12-07/`", lambda: (len(recipes()["rows"]),), str(RECIPES_FILE)),
    ("README.md", r"\(`finetune=all objective=mixed optim.lr=2e-3`: ([\d.]+), gap closed ([+-][\d.]+) against the donors trained alike\) "
                  r"does at ([\d.]+)x",
     lambda: (lambda r: (r["val_loss"], r["gap_closed_tuned"], fraction_with_teacher(r)))(recipe("finetune=all", "objective=mixed", "optim.lr=2e-3")),
     str(RECIPES_FILE)),
    ("README.md", r"ends at ([\d.]+): gap closed ([+-][\d.]+) as shipped, ([+-][\d.]+) trained alike, at ([\d.]+)x",
     lambda: (lambda r: (r["val_loss"], r["gap_closed"], r["gap_closed_tuned"], fraction_with_teacher(r)))(recipe("adapter=mlp", "layers.n70=8")),
     str(RECIPES_FILE)),
    # README: the three small-donor figures and their blocks
    ("README.md", r"\| ([\d.]+) \| the donor build's (\d+) validation blocks \((\d+) held-out files of the stdlib and (\d+) packages\)",
     lambda: (metric("small_val_loss"), manifest()["recipe"]["eval_blocks"], metric("val_documents"), len(manifest()["recipe"]["packages"])),
     str(MANIFEST_FILE)),
    ("README.md", r"\| ([\d.]+) \| the (\d+) held-out blocks shipped beside the donors",
     lambda: (metric("small_heldout_loss"), metric("heldout_blocks")), str(MANIFEST_FILE)),
    ("README.md", r"\| ([\d.]+) \| the default run's (\d+) validation blocks of `data=stdlib_source`",
     lambda: (recipe()["small"], default_config().data.max_val_blocks), str(RECIPES_FILE)),
    ("README.md", r"sharing one byte-level BPE tokenizer \(vocab (\d+)\)", lambda: (manifest()["recipe"]["vocab_size"],), str(MANIFEST_FILE)),
    ("README.md", r"the Python source of the stdlib and of the (\d+) packages", lambda: (len(manifest()["recipe"]["packages"]),), str(MANIFEST_FILE)),
    ("README.md", r"`stitch_grid`: n8 in \{(\d+), (\d+)\} x n70 in \{(\d+), (\d+)\} x \{linear, mlp\}, (\d+) steps each",
     lambda: (*grid_sweep("layers.n8"), *grid_sweep("layers.n70"), grid_config()["trainer"]["max_steps"]), "conf/experiment/stitch_grid.yaml"),
    # docs
    ("docs/embedded_donors.md", r"the build's (\d+) validation blocks .* on the (\d+) shipped blocks .* \(the default run: (\d+) blocks",
     lambda: (manifest()["recipe"]["eval_blocks"], metric("heldout_blocks"), default_config().data.max_val_blocks), str(MANIFEST_FILE)),
    ("docs/multi_gpu.md", r"runs at ([\d.]+)k tokens/s \(([\d.]+)% MFU, ([\d.]+) GB peak per GPU\) sharded with FSDP2", fsdp_numbers,
     str(FSDP_LOG)),
    ("docs/multi_gpu.md", r"and ([\d.]+)k tokens/s \(([\d.]+)%, ([\d.]+) GB; ([\d.]+)x one GPU's ([\d.]+)k\) on Megatron TP=2",
     lambda: (lambda rows: (rows["split_megatron_tp2"]["tokens_per_s"] / 1000, 100 * rows["split_megatron_tp2"]["mfu"],
                            rows["split_megatron_tp2"]["peak_mem_gb"],
                            rows["split_megatron_tp2"]["tokens_per_s"] / rows["split_megatron_tp1"]["tokens_per_s"],
                            rows["split_megatron_tp1"]["tokens_per_s"] / 1000))(load(TRAIN_STEP_FILE)["rows"]),
     str(TRAIN_STEP_FILE)),
    ("docs/real_donors.md", r"The studies' own sweep lists are for the shipped donors' (\d+) and (\d+) layers",
     lambda: (manifest()["recipe"]["small"]["num_layers"], manifest()["recipe"]["large"]["num_layers"]), str(MANIFEST_FILE)),
    # config comments
    ("conf/experiment/optuna_layers.yaml", r"1\.\.2 of the shipped small donor's (\d+) layers .* 1\.\.4 of the shipped large donor's (\d+) layers",
     lambda: (manifest()["recipe"]["small"]["num_layers"], manifest()["recipe"]["large"]["num_layers"]), str(MANIFEST_FILE)),
    ("conf/experiment/mlp_all_large_layers.yaml", r"the last \d+ of the shipped large donor's (\d+) layers",
     lambda: (manifest()["recipe"]["large"]["num_layers"],), str(MANIFEST_FILE)),
    ("conf/debug/quick.yaml", r"the shipped pair has (\d+) and (\d+)",
     lambda: (manifest()["recipe"]["small"]["num_layers"], manifest()["recipe"]["large"]["num_layers"]), str(MANIFEST_FILE)),
    ("conf/donors/tiny.yaml", r"Held-out loss: small ([\d.]+), large ([\d.]+)", lambda: (metric("small_val_loss"), metric("large_val_loss")),
     str(MANIFEST_FILE)),
    ("conf/donors/tiny.yaml", r"tokens end ([+-][\d.]+) of the gap past the small donor", lambda: (recipe()["gap_closed"],), str(RECIPES_FILE)),
]


@pytest.mark.parametrize("doc, pattern, values, source", CHECKS, ids=[f"{c[0]}:{i}" for i, c in enumerate(CHECKS)])
def test_doc_number_matches_its_source(doc: str, pattern: str, values: Callable[[], tuple[float, ...]], source: str) -> None:
    match = re.search(pattern, text_of(doc))
    assert match, f"{doc}: the sentence /{pattern}/ is gone or reworded (keep it tied: update this table)"
    expected = values()
    assert len(match.groups()) == len(expected)
    for printed, value in zip(match.groups(), expected):
        if printed.isalpha():  # a number in words
            printed = str(["zero", "one", "two", "three", "four", "five", "six"].index(printed))
        printed = re.sub(r"e-0*(\d)", r"e-\1", printed)
        assert close(printed, float(value)), f"{doc}: {printed} is not {value} ({source})"


def test_readme_last_line_is_what_the_default_run_prints() -> None:
    """The README's example last line is :func:`outcome_line` of the default run's record (split_recipes.json)."""
    from splitllama.results import outcome_line

    row, data = recipe(), recipes()
    record = {"task": "train", "metrics": {"val_loss": row["val_loss"], "gap_closed": row["gap_closed"], "gap_closed_tuned": row["gap_closed_tuned"]},
              "references": {"small": {"val_loss": row["small"]}, "large": {"val_loss": row["large"]},
                             "small_tuned": {"val_loss": data["small_tuned"]}, "large_tuned": {"val_loss": data["large_tuned"]}},
              "flops": {"fraction_of_large_donor": row["fraction_of_large_donor"]}}
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"^validation loss: .*$", readme, flags=re.M)
    assert shown and shown.group(0) == outcome_line(record)


def test_no_recipe_under_half_the_large_donors_flops_beats_the_small_donor_trained_alike() -> None:
    """The README's reading of the recipes grid: what beats the small donor trained alike costs half the large donor's
    training FLOPs or more (the teacher's forward counted)."""
    assert "none beats the small donor trained alike at under half the large donor's training FLOPs" in text_of("README.md")
    winners = [r for r in recipes()["rows"] if r["gap_closed_tuned"] > 0]
    assert winners and all(fraction_with_teacher(r) >= 0.5 for r in winners), [(r["name"], fraction_with_teacher(r)) for r in winners]
    assert not recipe()["beats_small_trained_alike"]  # "at this budget the default split does not pay for itself"


def test_grpo_table_is_its_results_json() -> None:
    """docs/rl.md's GRPO table: every row is the eval row of that step in the run's results.json."""
    history = load(GRPO_FILE)["grpo"]["history"]
    evals = {h["step"]: h for h in history if "eval_reward" in h}
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", (REPO / "docs" / "rl.md").read_text(), flags=re.M)
    assert [int(r[0]) for r in rows] == sorted(evals), "docs/rl.md's GRPO table has other steps than results.json's eval rows"
    for step, reward, parses, match, kl in rows:
        h = evals[int(step)]
        for printed, key in ((reward, "eval_reward"), (parses, "eval_rewards/header_parses/mean"),
                             (match, "eval_rewards/parameter_match/mean"), (kl, "eval_kl")):
            assert close(printed, h[key]), (step, key, printed, h[key])
    # the training reward averaged over each 10 steps
    means = re.search(r"the training reward, averaged over 10 steps, went ([\d., ]+)\.\)", text_of("docs/rl.md")).group(1)
    train = [h["reward"] for h in history if "reward" in h]
    assert len(train) == 60
    for i, printed in enumerate(p.strip() for p in means.split(",")):
        assert close(printed, sum(train[10 * i:10 * i + 10]) / 10), (i, printed)


def test_stitch_grid_table_is_its_summary_csv() -> None:
    """experiments/README.md's stitch_grid table: one row per run of experiments/stitch_grid/summary.csv, each number at
    its printed precision; the sweep size in the experiments table and in conf/experiment/stitch_grid.yaml."""
    rows = {r["job"]: r for r in grid_rows()}
    table = re.findall(r"^\| (\d+) \| (linear|mlp) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| ([+-][\d.]+) \| (\d+) \| (\d+) \| "
                       r"([\d.e+]+) \|$", (REPO / "experiments" / "README.md").read_text(), flags=re.M)
    assert sorted(t[0] for t in table) == sorted(rows), "the table's jobs are not summary.csv's"
    for job, adapter, n8, n70, loss, before, gap, gap_tuned, params, trainable, flops in table:
        r = rows[job]
        assert (adapter, n8, n70, params, trainable) == (r["adapter"], r["n8"], r["n70"], r["params"], r["trainable"]), job
        for printed, key in ((loss, "val_loss"), (before, "val_loss_before"), (gap, "gap_closed"), (gap_tuned, "gap_closed_tuned")):
            assert close(printed, float(r[key])), (job, key, printed, r[key])
        assert abs(float(flops) / float(r["flops_per_token"]) - 1) < 1e-3, (job, flops)
    n = len(rows)
    assert all(r["status"] == "ok" for r in rows.values())
    assert n == len(grid_sweep("layers.n8")) * len(grid_sweep("layers.n70")) * 2  # x adapter in {linear, mlp}
    experiments = text_of("experiments/README.md")
    assert f"{n} runs (8 ok)".replace("8 ok", f"{n} ok") in experiments and f"| {n} runs: n8 in" in experiments
    assert f"{n} runs on a 2-core CPU" in text_of("conf/experiment/stitch_grid.yaml")


def test_stitch_grid_reading_is_its_summary_csv() -> None:
    """Each statement of the stitch_grid reading, computed from summary.csv."""
    rows = grid_rows()
    text = text_of("experiments/README.md")
    first = rows[0]
    donors = re.search(r"the small donor scores ([\d.]+) as shipped and ([\d.]+) trained alike, the large donor ([\d.]+) and ([\d.]+)", text)
    assert donors, "the donors' sentence is gone"
    for printed, key in zip(donors.groups(), ("small_val_loss", "small_tuned_val_loss", "large_val_loss", "large_tuned_val_loss")):
        assert all(r[key] == first[key] for r in rows) and close(printed, float(first[key])), key
    gaps = [float(r["gap_closed"]) for r in rows]
    worse = re.search(r"every split is worse than the small donor as shipped \(gap closed ([+-][\d.]+) to ([+-][\d.]+)\)", text)
    assert worse and max(gaps) < 0 and close(worse.group(1), min(gaps)) and close(worse.group(2), max(gaps))
    gains = [float(r["val_loss_before"]) - float(r["val_loss"]) for r in rows]
    improves = re.search(r"Training improves every split by ([\d.]+) to ([\d.]+) nats", text)
    assert improves and min(gains) > 0 and close(improves.group(1), min(gains)) and close(improves.group(2), max(gains))
    cell = {(r["n8"], r["n70"], r["adapter"]): float(r["val_loss"]) for r in rows}
    n8s, n70s = sorted({r["n8"] for r in rows}), sorted({r["n70"] for r in rows})
    assert all(cell[("2", n70, a)] < cell[("1", n70, a)] for n70 in n70s for a in ("linear", "mlp")), "n8 = 2 beats n8 = 1 everywhere"
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert f"is n8 = {best['n8']}, n70 = {best['n70']} ({best['adapter']}, {float(best['val_loss']):.3f})" in text
    diffs = {(a, b): cell[(a, b, "linear")] - cell[(a, b, "mlp")] for a in n8s for b in n70s}
    within = re.search(r"Linear and MLP adapters end within ([\d.]+) nats of each other at every \(n8, n70\)", text)
    assert within and close(within.group(1), max(abs(d) for d in diffs.values()))
    mlp_ahead = sorted(k for k, d in diffs.items() if d > 0)
    assert f"ahead only at ({', '.join(mlp_ahead[0])})" in text and len(mlp_ahead) == 1, mlp_ahead
    # the Pareto front: no other run has both fewer FLOPs and a lower loss
    points = [(float(r["flops_per_token"]), float(r["val_loss"]), f"{r['adapter']} {r['n8']}+{r['n70']}") for r in rows]
    front = [name for f, l, name in sorted(points) if not any(f2 <= f and l2 < l for f2, l2, _ in points)]
    shown = re.search(r"\*\*Pareto front\*\* \(loss against training FLOPs\): ([^;]+);", text)
    assert shown and shown.group(1).split(", ") == front, (shown and shown.group(1), front)
