"""Sweeps as a user runs them (``run.py -m``, Optuna, submitit, W&B sweep files) and their analysis.

One real multirun (``debug=quick``: 6 jobs, 2 of them failing on purpose) is shared by the tests
of the summary, :mod:`splitllama.analysis` and the notebook. Multiruns on Hydra's basic launcher (that
one, Optuna's) run run.py in the test process; those whose launcher starts processes (joblib,
submitit) run it as a subprocess.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from splitllama.analysis import (donor_losses, load_sweep, pareto_front, plot_heatmaps, plot_pareto, reference_summary,
                                 separates_donors, stitching_curve, summary_table)
from splitllama.results import read_results
from tests.wandb_offline import find_run_file, read_offline_run

from tests.conftest import REPO, RunPy, compose_run_config

QUICK = "debug=quick"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``python run.py -m layers.n8=1 layers.n70=1,2,99 adapter=linear,mlp``: n70=99 fails in 2 jobs (one n8: a
    second doubled the jobs, and what varies with a layer count is shown along n70). The donors
    are trained alike (once for the whole sweep: the jobs share the budget, so the cache serves all but the first; one
    learning rate: choosing the best of a grid is test_references.py's).

    Run in this process (:meth:`RunPy.inline`): Hydra's basic launcher runs every job in the process that
    runs run.py, so this is the user's multirun without a subprocess's imports. What run.py prints (the
    summary) is kept as its stdout; the jobs' offline run files are whole when it returns (run_in_process
    tears W&B down as a run.py process's exit does: tests/wandb_offline.py). 4 steps (debug=quick's validation
    interval: one validation, at the end) train each donor alike well below its loss as shipped, which is all the
    tests of the references need."""
    import contextlib
    import io

    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_py.inline("-m", QUICK, "trainer.max_steps=4", "layers.n8=1", "layers.n70=1,2,99", "adapter=linear,mlp",
                      "finetune=adapter", "eval.tuned_references=true", "eval.tuned_lr_grid=[1e-3]", f"hydra.sweep.dir={sweep_dir}",
                      "eval.harness.tasks=[stdlib_docstring_name,stdlib_docstring_next]", "eval.harness.limit=4", cwd=sweep_dir.parent)
    return sweep_dir, stdout.getvalue()


@pytest.mark.slow
def test_multirun_goes_on_after_failures_and_prints_a_summary(sweep: tuple[Path, str]) -> None:
    sweep_dir, stdout = sweep
    statuses = {}
    for job in range(6):
        results = read_results(sweep_dir / str(job))
        statuses[job] = results["status"]
        if results["status"] == "failed":
            assert results["config"]["layers"]["n70"] == 99
            assert results["error"]["type"] == "RunConfigError" and "layers.n70=99" in results["error"]["message"]
    assert sorted(statuses.values()).count("ok") == 4 and sorted(statuses.values()).count("failed") == 2
    assert f"sweep {sweep_dir}: 6 runs (4 ok, 2 failed)" in stdout
    assert "val_loss" in stdout and "flops_per_token" in stdout
    assert "donors on the runs' validation blocks: small " in stdout and "gap_closed" in stdout
    assert "donors on the runs' validation blocks" in (sweep_dir / "summary.md").read_text()
    for name in ("heatmap.png", "pareto.png"):
        assert (sweep_dir / name).read_bytes().startswith(PNG)
    assert len((sweep_dir / "summary.csv").read_text().strip().splitlines()) == 7
    # downstream tasks (debug=quick scores ours on 4 items): the donors' scores, whether the task separates them beyond their
    # standard errors, and the gap closed only where it does; the printed table shows a task that separates them, and a
    # line names each that does not, with why (4 items rarely can)
    header = (sweep_dir / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"stdlib_docstring_next/acc_stderr", "stdlib_docstring_next/acc:large", "stdlib_docstring_next/acc:separates_donors",
            "stdlib_docstring_next/acc:gap_closed"} <= set(header)
    df = load_sweep(sweep_dir)
    table = stdout[stdout.index(f"sweep {sweep_dir}: 6 runs"):]
    for column in ("stdlib_docstring_name/acc", "stdlib_docstring_next/acc"):
        separated = separates_donors(df, column)
        assert separated is not None, column
        said = f"{column}: the donors (small " in table and "the task does not separate them, so it is left out of the table" in table
        assert said is not separated, (column, separated, table[:3000])
        header_row = next(line for line in table.splitlines() if line.split()[:2] == ["job", "status"])
        assert (column in header_row.split()) is separated
        assert bool(df[f"{column}:gap_closed"].notna().any()) is (separated and bool((df[f"{column}:large"] > df[f"{column}:small"]).all()))
    assert (sweep_dir / "harness_heatmap.png").read_bytes().startswith(PNG)
    # the W&B group of every job is the sweep
    run = read_offline_run(find_run_file(sweep_dir / "0" / "wandb"))
    assert run.group == f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"


@pytest.mark.slow
def test_load_sweep_gives_one_row_per_run(sweep: tuple[Path, str]) -> None:
    df = load_sweep(sweep[0])
    assert len(df) == 6 and list(df["job"]) == [str(i) for i in range(6)]
    for _, row in df.iterrows():  # columns agree with each job's own overrides
        assert f"layers.n8={row['n8']}" in row["overrides"] and f"layers.n70={row['n70']}" in row["overrides"]
        assert f"adapter={row['adapter']}" in row["overrides"]
        assert (row["status"] == "ok") == (row["n70"] != 99)
    ok = df[df["status"] == "ok"]
    assert ok["val_loss"].map(math.isfinite).all() and ok["val_loss_before"].map(math.isfinite).all()
    failed = df[df["status"] == "failed"]
    assert failed["val_loss"].isna().all() and failed["error"].str.contains("layers.n70=99").all()
    for (adapter, n8), group in ok.groupby(["adapter", "n8"]):  # deeper large part: more parameters, more FLOPs
        group = group.sort_values("n70")
        assert group["params"].is_monotonic_increasing and group["flops_per_token"].is_monotonic_increasing
    trainable = ok.groupby("adapter")["trainable"].first()
    assert trainable["linear"] == 128 * 256 + 256 and trainable["mlp"] > trainable["linear"]
    table = summary_table(df)
    assert table.splitlines()[2].split()[1] == "ok" and table.splitlines()[-1].split()[1] == "failed"


@pytest.mark.slow
def test_load_sweep_carries_the_donors_and_the_gap_closed(sweep: tuple[Path, str]) -> None:
    df = load_sweep(sweep[0])
    ok = df[df["status"] == "ok"]
    # every job scored the same two donors on the same validation blocks
    assert ok["small_val_loss"].nunique() == 1 and ok["large_val_loss"].nunique() == 1
    small, large = ok["small_val_loss"].iloc[0], ok["large_val_loss"].iloc[0]
    assert small != large
    assert ok["gap_closed"].to_numpy() == pytest.approx(((small - ok["val_loss"]) / (small - large)).to_numpy())
    assert ok["gap_closed_before"].to_numpy() == pytest.approx(((small - ok["val_loss_before"]) / (small - large)).to_numpy())
    assert df.loc[df["status"] == "failed", "gap_closed"].isna().all()
    # and the donors trained alike on the sweep's data and budget, the same for every job (trained once, cached)
    assert ok["small_tuned_val_loss"].nunique() == 1 and ok["large_tuned_val_loss"].nunique() == 1
    small_t, large_t = ok["small_tuned_val_loss"].iloc[0], ok["large_tuned_val_loss"].iloc[0]
    assert small_t < small and large_t < large
    assert ok["gap_closed_tuned"].to_numpy() == pytest.approx(((small_t - ok["val_loss"]) / (small_t - large_t)).to_numpy())
    assert donor_losses(df) == {"small": pytest.approx(small), "large": pytest.approx(large),
                                "small_tuned": pytest.approx(small_t), "large_tuned": pytest.approx(large_t)}
    assert "trained alike on the runs' data and budget: small" in reference_summary(df)


@pytest.mark.slow
def test_figures_draw_the_donors_as_reference_lines(sweep: tuple[Path, str]) -> None:
    import matplotlib.pyplot as plt

    df = load_sweep(sweep[0])
    refs = donor_losses(df)
    pareto = plot_pareto(df)
    lines = {line.get_label(): line.get_ydata()[0] for line in pareto.axes[0].get_lines()}
    assert lines[f"small donor as shipped ({refs['small']:.3f})"] == pytest.approx(refs["small"])
    assert lines[f"large donor as shipped ({refs['large']:.3f})"] == pytest.approx(refs["large"])
    assert lines[f"small donor trained alike ({refs['small_tuned']:.3f})"] == pytest.approx(refs["small_tuned"])
    heatmap = plot_heatmaps(df)
    colorbar = heatmap.axes[-1]  # the colour bar spans both donors and marks them
    low, high = sorted(colorbar.get_ylim())
    assert low <= min(refs.values()) and high >= max(refs.values())
    assert sorted(line.get_ydata()[0] for line in colorbar.get_lines()) == pytest.approx(sorted(refs.values()))
    assert any("gap" in t.get_text() for t in heatmap.axes[0].texts)
    plt.close("all")


@pytest.mark.slow
def test_pareto_front_is_the_non_dominated_runs(sweep: tuple[Path, str]) -> None:
    import pandas as pd

    df = load_sweep(sweep[0])
    front = pareto_front(df, "flops_per_token", "val_loss")
    ok = df[df["status"] == "ok"]
    assert front.any() and not front[df["status"] != "ok"].any()
    for i, row in ok.iterrows():
        dominated = ((ok["flops_per_token"] <= row["flops_per_token"]) & (ok["val_loss"] <= row["val_loss"])
                     & ((ok["flops_per_token"] < row["flops_per_token"]) | (ok["val_loss"] < row["val_loss"]))).any()
        assert front[i] == (not dominated)
    toy = pd.DataFrame({"status": ["ok"] * 4, "x": [1.0, 2.0, 3.0, 2.5], "y": [3.0, 1.0, 0.5, 2.0]})
    assert pareto_front(toy, "x", "y").tolist() == [True, True, True, False]


@pytest.mark.slow
def test_notebook_builds_the_table_and_figures(sweep: tuple[Path, str], tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "sweep_analysis.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"sweep_dir = {str(sweep[0])!r}\nfigures_dir = {str(tmp_path / 'figures')!r}"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "6 runs" in text and "'failed': 2" in text
    assert "donors on the runs' validation blocks" in text and "gap_closed" in text
    assert "val_loss" in text and "flops_per_token" in text
    assert "stdlib_docstring_next/acc:gap_closed" in text  # the downstream-task cell
    for name in ("heatmap.png", "pareto.png"):
        assert (tmp_path / "figures" / name).read_bytes().startswith(PNG)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_optuna_searches_layer_counts_and_reports_the_pareto_front(run_py: RunPy, tmp_path: Path) -> None:
    """Optuna's sweeper launches its trials through Hydra's basic launcher (in the process that runs
    run.py), so the multirun runs in this process (:meth:`RunPy.inline`)."""
    run_py.inline("-m", "experiment=optuna_layers", QUICK, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 's'}",
                  cwd=tmp_path)
    report = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    assert report["name"] == "optuna" and report["solutions"]
    df = load_sweep(tmp_path / "s")
    assert len(df) == 3 and (df["status"] == "ok").all()
    front = df[pareto_front(df, "flops_per_token", "val_loss")]
    # Optuna's Pareto solutions are exactly our front: (loss, GFLOPs/token) per run
    ours = sorted((round(r.val_loss, 5), round(r.flops_per_token / 1e9, 6)) for r in front.itertuples())
    theirs = sorted((round(s["values"][0], 5), round(s["values"][1], 6)) for s in report["solutions"])
    assert ours == theirs
    for s in report["solutions"]:
        assert 1 <= s["params"]["layers.n8"] <= 4 and 1 <= s["params"]["layers.n70"] <= 8


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process(run_py: RunPy, tmp_path: Path) -> None:
    run_py("-m", "experiment=submitit_local", QUICK, "logger=none", "layers.n70=2,3", f"hydra.sweep.dir={tmp_path / 's'}",
           cwd=tmp_path)
    df = load_sweep(tmp_path / "s")
    assert sorted(df["n70"]) == [2, 3] and (df["status"] == "ok").all()
    assert list((tmp_path / "s" / ".submitit").glob("*/*_result.pkl"))
    # the jobs run side by side: one torch thread each (experiment=submitit_local), not one per core each
    assert {read_results(Path(d))["cpu_threads"] for d in df["run_dir"]} == {1}


def test_slurm_launcher_composes() -> None:
    """What ``run.py experiment=slurm ... --cfg hydra`` prints, composed in-process."""
    launcher = compose_run_config("experiment=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                                  hydra_node=True).hydra.launcher
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"]) == ("gpu", 4, 240)


@pytest.mark.parametrize("name", ["grid.yaml", "bayes_lr.yaml"])
def test_wandb_sweep_files_pass_valid_overrides(name: str) -> None:
    spec = yaml.safe_load((REPO / "sweeps" / name).read_text())
    assert spec["program"] == "run.py" and "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == "final/val_loss"
    overrides = []
    for key, domain in spec["parameters"].items():
        value = domain["value"] if "value" in domain else domain["values"][0] if "values" in domain else domain["min"]
        overrides.append(f"{key}={value}")
    cfg = compose_run_config(*overrides)  # each parameter is a valid, type-checked run.py override
    assert cfg.logger.mode.name == "online"


def test_stitch_grid_experiment_is_an_eight_run_grid() -> None:
    """What ``run.py experiment=stitch_grid --cfg all`` prints, composed in-process."""
    from omegaconf import OmegaConf

    cfg = compose_run_config("experiment=stitch_grid", hydra_node=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    grid = [str(v).split(",") for v in params.values()]
    assert set(params) == {"layers.n8", "layers.n70", "adapter"} and math.prod(len(g) for g in grid) == 8
    assert cfg.logger.kind.name == "csv" and cfg.trainer.max_steps == 60
    assert cfg.hydra.sweep.dir.startswith("multirun/stitch_grid/")


def test_stitching_curve_study_spans_the_embedded_donors() -> None:
    """The study's grid: n70 from 1 to all of the default large donor's layers (1, 2, 3, 5, 7, 10), n8 at
    half and all of the small donor's, two objectives, three seeds (72 runs), at the default run's budget
    with the donors trained alike as references."""
    from omegaconf import OmegaConf

    from splitllama.run.settings import embedded_recipe

    cfg = compose_run_config("experiment=stitching_curve", "hydra/sweeper=basic", hydra_node=True)
    params = {k: [int(v) if v.isdigit() else v for v in str(value).split(",")] for k, value in cfg.hydra.sweeper.params.items()}
    recipe = embedded_recipe(cfg)
    assert params["layers.n70"] == [1, 2, 3, 5, 7, 10] and params["layers.n70"][-1] == recipe.large.num_layers
    assert params["layers.n8"] == [2, 4] and params["layers.n8"][-1] == recipe.small.num_layers
    assert params["seed"] == [0, 1, 2] and math.prod(len(v) for v in params.values()) == 72
    assert params["+series"] == ["lstsq_last", "lstsq_last_distill"] and cfg.eval.tuned_references is True
    default = compose_run_config()
    for key in ("trainer.max_steps", "optim.lr", "data.batch_size", "data.seq_len", "optim.warmup_steps"):  # the default run's budget
        assert OmegaConf.select(cfg, key) == OmegaConf.select(default, key), key


@pytest.mark.slow
def test_stitching_curve_study_runs_side_by_side_and_reads_as_a_curve(run_py: RunPy, tmp_path: Path) -> None:
    """``experiment=stitching_curve``, reduced (n8=1, n70=1, 2 seeds; both objectives; 4 steps: 4 runs; the donors
    trained alike at one learning rate) through the joblib launcher, 2 jobs at a time with 1 torch thread each; then
    its table, figure and notebook. (A curve over several n70, with the donors at their cost: the hand-made runs of
    the next test.)"""
    import nbformat
    from nbclient import NotebookClient

    sweep_dir = tmp_path / "s"
    run_py("-m", "experiment=stitching_curve", QUICK, "layers.n8=1", "layers.n70=1", "seed=0,1", "trainer.max_steps=4",
           "eval.tuned_lr_grid=[1e-3]", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", "parallel.cpu_threads=1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    df = load_sweep(sweep_dir)
    assert len(df) == 4 and (df["status"] == "ok").all(), summary_table(df)
    assert {read_results(Path(d))["cpu_threads"] for d in df["run_dir"]} == {1}
    assert set(zip(df["init"], df["finetune"], df["objective"])) == {("lstsq", "adapter+last", "lm"), ("lstsq", "adapter+last", "distill")}
    curve = stitching_curve(df)
    assert sorted(curve["series"].unique()) == ["lstsq + last", "lstsq + last, distill"]
    assert len(curve) == 2 and (curve["seeds"] == 2).all() and curve["val_loss_std"].notna().all()
    # a distilled split's cost counts its teacher's forward: the same split costs more
    costs = curve.set_index(["series", "n70"])["flops_fraction"]
    assert (costs["lstsq + last, distill"] > costs["lstsq + last"]).all()
    assert df["small_val_loss"].notna().all() and df["large_val_loss"].notna().all()  # the reference lines

    nb = nbformat.read(REPO / "notebooks" / "stitching_curve.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"sweep_dir = {str(sweep_dir)!r}\nfigures_dir = {str(tmp_path / 'figures')!r}"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    table = (tmp_path / "figures" / "stitching_curve.md").read_text()
    assert "| lstsq + last | 1 | 1 | 2 |" in table and " ± " in table
    assert (tmp_path / "figures" / "stitching_curve.png").read_bytes().startswith(PNG)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "4 runs" in text and "donors as shipped" in text and (tmp_path / "figures" / "front.md").is_file()


def _stitching_results(run_dir: Path, *, init: str, seed: int, n70: int, val_loss: float, train_flops: float,
                       large_donor_flops: float | None) -> None:
    """A hand-made ``results.json`` of a stitching run on the embedded donors (h128 x 4 -> h256 x 10)."""
    embedded = {"vocab_size": 4096,
                "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "intermediate_size": 448},
                "large": {"hidden_size": 256, "num_layers": 10, "num_heads": 8, "num_kv_heads": 2, "head_dim": 32, "intermediate_size": 896}}
    flops = {"train_flops_per_token": train_flops}
    if large_donor_flops is not None:
        flops["large_donor_train_flops_per_token"] = large_donor_flops
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "status": "ok",
        "config": {"adapter": {"kind": "linear", "init": init}, "finetune": {"trainable": ["adapter"]}, "seed": seed,
                   "donors": {"embedded": embedded}, "data": {"seq_len": 128}},
        "split": {"n8": 2, "n70": n70, "adapter": "linear"},
        "metrics": {"val_loss_before": val_loss + 1.0, "val_loss": val_loss, "gap_closed": None},
        "references": {"small": {"val_loss": 3.0}, "large": {"val_loss": 2.6}},
        "flops": flops,
        "timings": {"fit_s": 10.0 + seed},
    }))


def test_stitching_curve_puts_splits_and_donors_on_the_large_donors_cost_scale(tmp_path: Path) -> None:
    """Hand-made runs: each split's training FLOPs per token as a fraction of the large donor's, the
    large donor's own cost computed from its shape when ``results.json`` lacks it, the small donor's
    from its shape (the 4 x h128 donor: 8,847,360 of the 10 x h256 donor's 59,375,616 FLOPs per
    token), and the figure's cost row with the donors as points at their own cost."""
    from splitllama.analysis import donor_costs, donor_train_flops_per_token, plot_stitching_curve, stitching_curve_table, stitching_runs

    large = 59_375_616.0  # 6 x (10 x 851,968 + 256 x 4096) + 6 x 128 x 10 x 256
    for job, (init, seed, n70, loss, flops, logged) in enumerate([
            ("lstsq", 0, 1, 4.0, 14_647_296.0, large), ("lstsq", 1, 1, 4.2, 14_647_296.0, None),
            ("random", 0, 5, 5.0, 35_880_960.0, large), ("random", 1, 5, 5.4, 35_880_960.0, None)]):
        _stitching_results(tmp_path / str(job), init=init, seed=seed, n70=n70, val_loss=loss, train_flops=flops, large_donor_flops=logged)
    df = load_sweep(tmp_path)
    shape = {"hidden_size": 256, "num_layers": 10, "num_heads": 8, "num_kv_heads": 2, "head_dim": 32, "intermediate_size": 896}
    assert donor_train_flops_per_token(shape, 4096, 128) == large
    assert donor_costs(df) == pytest.approx({"small": 8_847_360 / large, "large": 1.0})

    curve = stitching_curve(df).set_index("series")
    assert curve.loc["lstsq", "flops_fraction"] == pytest.approx(14_647_296 / large)  # both seeds agree: the mean is exact
    assert curve.loc["random", "flops_fraction"] == pytest.approx(35_880_960 / large)
    assert curve.loc["random", "val_loss_mean"] == pytest.approx(5.2)
    assert "| lstsq | 2 | 1 | 2 | 0.2467 | 5.100 ± 0.141 | 4.100 ± 0.141 |" in stitching_curve_table(curve.reset_index())

    runs = stitching_runs(df)
    assert runs[["series", "seed", "val_loss", "fit_s"]].values.tolist() == [
        ["lstsq", 0, 4.0, 10.0], ["lstsq", 1, 4.2, 11.0], ["random", 0, 5.0, 10.0], ["random", 1, 5.4, 11.0]]
    assert runs["flops_fraction"].tolist() == pytest.approx([14_647_296 / large] * 2 + [35_880_960 / large] * 2)

    fig = plot_stitching_curve(df, out=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes().startswith(PNG)
    loss_vs_n70, loss_vs_cost = fig.axes
    assert sorted(loss_vs_n70.get_xticks()) == [1, 5]
    stars = {line.get_label().split(" donor")[0]: [line.get_xdata()[0], line.get_ydata()[0]]
             for line in loss_vs_cost.get_lines() if line.get_marker() == "*"}
    assert set(stars) == {"small", "large"}
    assert stars["small"] == pytest.approx([8_847_360 / large, 3.0]) and stars["large"] == pytest.approx([1.0, 2.6])
    trained = {bars.get_label(): bars.lines[0].get_xydata().ravel().tolist() for bars in loss_vs_cost.containers}
    assert trained["random: trained"] == pytest.approx([35_880_960 / large, 5.2])
    assert trained["lstsq: trained"] == pytest.approx([14_647_296 / large, 4.1])


def test_load_wandb_offline_names_the_local_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitllama.analysis import load_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match=r"W&B online \(WANDB_MODE=offline\).*load_sweep"):
        load_wandb("splitllama", group="sweep-x")


def test_sweep_figures_keep_legends_off_the_colour_bar_and_draw_the_donors_at_their_cost(tmp_path: Path) -> None:
    """Hand-made runs with their costs (as in the test above): the Pareto figure draws each donor as a star at its own
    training FLOPs per token (the small donor at 8,847,360 / 59,375,616 = 0.149 of the large one's, the large at 1),
    beside the dashed lines; no legend of either figure overlaps a colour bar or the axes' data area."""
    import matplotlib.pyplot as plt

    from splitllama.analysis import plot_heatmaps, plot_pareto

    large = 59_375_616.0
    for job, (init, seed, n70, loss, flops) in enumerate([("lstsq", 0, 1, 4.0, 14_647_296.0), ("lstsq", 0, 5, 3.5, 35_880_960.0)]):
        _stitching_results(tmp_path / str(job), init=init, seed=seed, n70=n70, val_loss=loss, train_flops=flops, large_donor_flops=large)
    df = load_sweep(tmp_path)

    pareto = plot_pareto(df, out=tmp_path / "pareto.png")
    ax = pareto.axes[0]
    stars = {line.get_label().split(" donor")[0]: [line.get_xdata()[0], line.get_ydata()[0]] for line in ax.get_lines() if line.get_marker() == "*"}
    assert stars["small"] == pytest.approx([8_847_360.0, 3.0]) and stars["large"] == pytest.approx([large, 2.6])
    assert any("0.15x the large donor's FLOPs" in line.get_label() for line in ax.get_lines())
    renderer = pareto.canvas.get_renderer()
    legend = ax.get_legend()
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), "the legend covers the plot"

    heatmap = plot_heatmaps(df, out=tmp_path / "heatmap.png")
    colorbar = heatmap.axes[-1]
    renderer = heatmap.canvas.get_renderer()
    assert colorbar.get_legend() is None and len(heatmap.legends) == 1
    (legend,) = heatmap.legends
    assert {t.get_text().split(" (")[0] for t in legend.get_texts()} == {"small donor as shipped", "large donor as shipped"}
    assert not legend.get_window_extent(renderer).overlaps(colorbar.get_window_extent(renderer)), "the legend covers the colour bar"
    assert not any(legend.get_window_extent(renderer).overlaps(a.get_window_extent(renderer)) for a in heatmap.axes)
    plt.close("all")
