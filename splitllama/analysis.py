"""Sweep analysis: every run of a sweep in one DataFrame, heatmaps over (n8, n70), Pareto fronts.

A sweep is a Hydra multirun directory (``multirun/<date>/<time>/<job>/results.json``, written
by ``run.py`` for every job, failed ones included) or a W&B project/group (online, through
``wandb.Api``). Both give the same columns::

    df = load_sweep("multirun/2026-11-22/19-40-00")
    print(summary_table(df))
    plot_heatmaps(df, out="heatmap.png")          # validation loss over (n8, n70), one panel per adapter
    plot_pareto(df, x="flops_per_token", out="pareto.png")

Columns: ``job``, ``status`` (ok | interrupted | failed | diverged: every status but ok counts as a failed
trial, kept out of the figures and listed last), ``error``, ``task``, ``adapter``, ``n8``,
``n70`` (the layers the run used; the requested ones if it failed before resolving them),
``val_loss``, ``val_loss_before``, ``val_ppl``, ``steps``, ``params``, ``trainable``,
``flops_per_token`` (training FLOPs per token), ``runtime_s``, ``overrides``, ``run_dir``; and,
for runs that scored downstream tasks (``eval.harness``), the columns of :func:`harness_columns`:
``<task>/<metric>`` and ``<task>/<metric>_stderr``, the donors' ``<task>/<metric>:small`` and
``:large``, and ``<task>/<metric>:gap_closed`` (0 at the small donor's score, 1 at the large one's).

The donors are the reference of every run (:mod:`splitllama.references`): ``small_val_loss`` and
``large_val_loss`` are the two donors scored on the run's own validation blocks, ``gap_closed``
(and ``gap_closed_before``, before training) is ``(small - split) / (small - large)``: 0 at the
small donor, 1 at the large. The heatmap and the Pareto figure draw the donors as reference lines.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from .results import RESULTS_FILE

#: the donors as references, scored on each run's validation blocks (results.json ``references``, ``metrics.gap_closed``)
REFERENCE_COLUMNS = ["small_val_loss", "large_val_loss", "gap_closed", "gap_closed_before", "small_tuned_val_loss",
                     "large_tuned_val_loss", "gap_closed_tuned"]
COLUMNS = ["job", "status", "adapter", "init", "finetune", "seed", "n8", "n70", "val_loss", "val_loss_before", "val_ppl", *REFERENCE_COLUMNS, "steps",
           "params", "trainable", "flops_per_token", "runtime_s", "task", "error", "overrides", "run_dir"]
#: the columns :func:`summary_table` shows
SUMMARY_COLUMNS = ["job", "status", "adapter", "n8", "n70", "val_loss", "val_loss_before", "gap_closed", "gap_closed_tuned",
                   "params", "trainable", "flops_per_token", "runtime_s"]


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _requested_layers(config: dict[str, Any]) -> tuple[Any, Any]:
    layers, donors = config.get("layers") or {}, config.get("donors") or {}
    n8 = layers.get("n8") if layers.get("n8") is not None else (len(layers["list8"]) if layers.get("list8") else donors.get("default_n8"))
    n70 = layers.get("n70") if layers.get("n70") is not None else (len(layers["list70"]) if layers.get("list70") else donors.get("default_n70"))
    return n8, n70


def _number(value: Any) -> float:
    """A metric as a float; ``None`` (undefined, e.g. ``gap_closed`` of equal donors) and strings (``"nan"``, ``"inf"``:
    how results.json writes a non-finite number) as NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def reference_values(results: dict[str, Any]) -> dict[str, float]:
    """The :data:`REFERENCE_COLUMNS` of one run's ``results.json`` (NaN where the run has none)."""
    references, metrics = results.get("references") or {}, results.get("metrics") or {}
    return {
        "small_val_loss": _number((references.get("small") or {}).get("val_loss")),
        "large_val_loss": _number((references.get("large") or {}).get("val_loss")),
        "gap_closed": _number(metrics.get("gap_closed")),
        "gap_closed_before": _number(metrics.get("gap_closed_before")),
        # the donors trained alike (eval.tuned_references): the reference that says whether splitting paid
        "small_tuned_val_loss": _number((references.get("small_tuned") or {}).get("val_loss")),
        "large_tuned_val_loss": _number((references.get("large_tuned") or {}).get("val_loss")),
        "gap_closed_tuned": _number(metrics.get("gap_closed_tuned")),
    }


def adapter_init_of(results: dict[str, Any]) -> str | None:
    """How a run's adapter started: results.json's ``split.adapter_init`` (the resolved init,
    :func:`splitllama.run.model.adapter_init_used`); for a record written before it was kept, the same rule read
    off the config (``adapter.init``, else least squares for a linear, low-rank or MLP adapter on the hf backend,
    else random; ``checkpoint`` for a trained adapter, ``none`` for the identity adapter)."""
    recorded = (results.get("split") or {}).get("adapter_init")
    if recorded:
        return recorded
    config = results.get("config") or {}
    adapter, backend = config.get("adapter") or {}, config.get("backend") or {}
    if not adapter:
        return None
    if adapter.get("checkpoint"):
        return "checkpoint"
    if adapter.get("kind") == "identity":
        return "none"
    if adapter.get("init"):
        return adapter["init"]
    return "lstsq" if adapter.get("kind") in ("linear", "lowrank", "mlp") and backend.get("name", "hf") == "hf" else "random"


def _training_setup(results: dict[str, Any]) -> dict[str, Any]:
    """How a run's adapter started and what trained: ``init`` (:func:`adapter_init_of`), ``finetune``
    (the trainable parts joined by ``+``, ``+lora`` with LoRA) and ``seed``."""
    config = results.get("config") or {}
    finetune = config.get("finetune") or {}
    parts = list(finetune.get("trainable") or []) + (["lora"] if (finetune.get("lora") or {}).get("enabled") else [])
    return {"init": adapter_init_of(results), "finetune": "+".join(parts) or None, "seed": config.get("seed"),
            "objective": (config.get("objective") or {}).get("kind")}


def run_row(results: dict[str, Any], run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """One flat row from a run's ``results.json`` content."""
    config = results.get("config") or {}
    split = results.get("split") or {}
    metrics, params, flops = results.get("metrics") or {}, results.get("params") or {}, results.get("flops") or {}
    n8, n70 = (split["n8"], split["n70"]) if split else _requested_layers(config)
    run_dir = Path(run_dir) if run_dir is not None else Path((results.get("paths") or {}).get("run_dir", "."))
    error = results.get("error")
    return {
        "job": run_dir.name,
        "status": results.get("status"),
        "adapter": split.get("adapter") or (config.get("adapter") or {}).get("kind"),
        **_training_setup(results),
        "n8": n8,
        "n70": n70,
        # _number: a non-finite loss is written as the string "nan" (JSON has no NaN); one such string broke the summary
        "val_loss": _number(metrics.get("val_loss")),
        "val_loss_before": _number(metrics.get("val_loss_before")),
        "val_ppl": _number(metrics.get("val_ppl")),
        **reference_values(results),
        "steps": metrics.get("steps"),
        "params": params.get("total"),
        "trainable": params.get("trainable"),
        "flops_per_token": flops.get("train_flops_per_token", math.nan),
        "runtime_s": (results.get("timings") or {}).get("total_s", math.nan),
        "task": results.get("task"),
        "error": f"{error['type']}: {error['message']}" if error else None,
        "overrides": " ".join(_hydra_overrides(run_dir)),
        "run_dir": str(run_dir),
        **harness_columns(metrics.get("harness") or {},
                          {which: ref.get("scores", {}) for which, ref in ((results.get("references") or {}).get("harness") or {}).items()}),
    }


def load_sweep(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every run under a multirun directory (any depth), one row each, ordered by job number."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    rows = [run_row(json.loads(p.read_text()), p.parent) for p in sweep_dir.rglob(RESULTS_FILE)]
    if not rows:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {sweep_dir}: not a run.py sweep (or no job has finished)")
    df = pd.DataFrame(rows, columns=COLUMNS + _extra_columns(rows))
    order = pd.to_numeric(df["job"], errors="coerce")
    return df.assign(_order=order).sort_values(["_order", "run_dir"]).drop(columns="_order").reset_index(drop=True)


def load_wandb(project: str, *, entity: str | None = None, group: str | None = None, api: Any = None) -> pd.DataFrame:
    """The runs of a W&B project (optionally one sweep group), online through ``wandb.Api``.

    run.py logs the resolved config (with the ``split`` it used), ``final/val_loss``,
    ``params/*`` and ``flops/*``; offline runs must be synced first (``wandb sync <run dir>/wandb``).
    """
    import wandb

    if api is None:
        if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            raise RuntimeError(f"load_wandb needs W&B online (WANDB_MODE={os.environ['WANDB_MODE']}); "
                               "for local runs use load_sweep(<multirun dir>)")
        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    rows = []
    for run in api.runs(path, filters={"group": group} if group else None):
        config, summary = dict(run.config), dict(run.summary)
        split = config.get("split") or {}
        n8, n70 = (split["n8"], split["n70"]) if split else _requested_layers(config)
        state = {"finished": "ok", "crashed": "failed", "failed": "failed"}.get(run.state, run.state)
        rows.append({
            "job": run.name, "status": state, "adapter": split.get("adapter") or (config.get("adapter") or {}).get("kind"),
            **_training_setup({"config": config, "split": split}),
            "n8": n8, "n70": n70, "val_loss": summary.get("final/val_loss", summary.get("val/loss", math.nan)),
            "val_loss_before": summary.get("final/val_loss_before", math.nan), "val_ppl": summary.get("val/ppl", math.nan),
            "small_val_loss": summary.get("ref/small_val_loss", math.nan), "large_val_loss": summary.get("ref/large_val_loss", math.nan),
            "gap_closed": summary.get("final/gap_closed", math.nan), "gap_closed_before": summary.get("final/gap_closed_before", math.nan),
            "steps": summary.get("trainer/global_step"), "params": summary.get("params/total"),
            "trainable": summary.get("params/trainable"), "flops_per_token": summary.get("flops/train_per_token", math.nan),
            "runtime_s": summary.get("_runtime", math.nan), "task": (config.get("task") or {}).get("name"),
            "error": None, "overrides": run.group or "", "run_dir": run.url,
            **harness_columns(*_harness_from_logged(summary)),
        })
    if not rows:
        raise LookupError(f"no W&B runs in {path}" + (f" group {group}" if group else ""))
    return pd.DataFrame(rows, columns=COLUMNS + _extra_columns(rows))


def pareto_front(df: pd.DataFrame, x: str = "flops_per_token", y: str = "val_loss") -> pd.Series:
    """Boolean mask of the runs no other run beats on both ``x`` and ``y`` (both minimised).

    Failed runs and runs missing either value are never on the front.
    """
    valid = df[x].notna() & df[y].notna() & (df["status"] == "ok")
    points = df.loc[valid, [x, y]].to_numpy(dtype=float)
    on_front = pd.Series(False, index=df.index)
    for index, (px, py) in zip(df.index[valid], points):
        dominated = ((points[:, 0] <= px) & (points[:, 1] <= py) & ((points[:, 0] < px) | (points[:, 1] < py))).any()
        on_front[index] = not dominated
    return on_front


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def summary_table(df: pd.DataFrame, columns: Sequence[str] | None = None, *, markdown: bool = False) -> str:
    """The sweep as a text (or Markdown) table, best validation loss first, runs that did not end ok (failed, diverged) last
    (default columns: SUMMARY_COLUMNS and the headline score of each downstream task that separates the donors,
    :func:`separates_donors`; :func:`harness_signal_summary` names the others)."""
    columns = list(columns) if columns is not None else SUMMARY_COLUMNS + [c for c in harness_summary_columns(df)
                                                                          if separates_donors(df, c) is not False]
    ordered = df.assign(_failed=df["status"] != "ok").sort_values(["_failed", "val_loss"], na_position="last")
    cells = [[_fmt(row[c]) for c in columns] for _, row in ordered.iterrows()]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def donor_losses(df: pd.DataFrame) -> dict[str, float]:
    """The small and large donors' validation losses over a sweep's runs (median; NaN where none scored them).

    The runs of one sweep share their validation blocks, so each donor has one value; runs on
    different blocks (``data.max_val_blocks`` swept) get the median, and :func:`reference_summary`
    says how far they spread.
    """
    return {which: float(df[f"{which}_val_loss"].median()) if f"{which}_val_loss" in df and df[f"{which}_val_loss"].notna().any()
            else math.nan for which in ("small", "large", "small_tuned", "large_tuned")}


def reference_summary(df: pd.DataFrame) -> str:
    """One line naming the donors' losses, the scale ``gap_closed`` is on (or why there is none); then a line for each
    downstream task that does not separate the donors (:func:`harness_signal_summary`)."""
    refs = donor_losses(df)
    signal = harness_signal_summary(df)  # the downstream tasks that cannot tell the donors apart, and why they are not shown
    if math.isnan(refs["small"]) or math.isnan(refs["large"]):
        line = "donors: not scored (eval.references=false, or runs made before donors were scored)"
        return f"{line}\n{signal}" if signal else line
    spread = max(float(df[f"{w}_val_loss"].max() - df[f"{w}_val_loss"].min()) for w in ("small", "large"))
    line = (f"donors on the runs' validation blocks: small {refs['small']:.4f}, large {refs['large']:.4f} "
            f"(gap_closed = (small - split) / (small - large): 0 = small donor, 1 = large donor)")
    if spread > 1e-6:
        line += f"; the runs' donor scores differ by up to {spread:.3g} (different validation blocks): medians shown"
    if refs["large"] >= refs["small"]:
        line += "; the large donor is not better than the small one, so gap_closed has no meaningful direction"
    if not math.isnan(refs["small_tuned"]) and not math.isnan(refs["large_tuned"]):
        line += (f"; trained alike on the runs' data and budget: small {refs['small_tuned']:.4f}, large {refs['large_tuned']:.4f} "
                 "(gap_closed_tuned: the same scale between them; below 0 the small donor trained alike is better)")
    else:
        line += "; donors not trained alike (eval.tuned_references off): gap_closed also counts what training on the data buys"
    return f"{line}\n{signal}" if signal else line


def _draw_reference_lines(ax: Any, refs: dict[str, float], *, lw: float = 1.2) -> None:
    """Horizontal lines at the donors' losses on a loss y-axis, labelled: dashed as shipped, solid when trained
    alike (on the runs' data and budget, the reference a split must beat)."""
    for which, color in (("small", "tab:red"), ("large", "tab:green")):
        value = refs.get(which, math.nan)
        if not math.isnan(value):
            ax.axhline(value, lw=lw, ls="--", color=color, label=f"{which} donor as shipped ({value:.3f})")
        tuned = refs.get(f"{which}_tuned", math.nan)
        if not math.isnan(tuned):
            ax.axhline(tuned, lw=lw, ls="-", color=color, alpha=0.7, label=f"{which} donor trained alike ({tuned:.3f})")


def plot_heatmaps(df: pd.DataFrame, value: str = "val_loss", *, out: str | os.PathLike[str] | None = None):
    """One heatmap per adapter of ``value`` over (n8 rows, n70 columns); failed cells marked ``x``.

    For a loss, the donors are the reference: the colour scale spans both donors' losses, which
    are marked on the colour bar, and each cell also shows its ``gap_closed``.
    """
    import matplotlib.pyplot as plt  # headless machines get Agg by themselves; notebooks keep inline
    import numpy as np

    adapters = sorted(df["adapter"].dropna().unique())
    n8s, n70s = sorted(df["n8"].dropna().unique()), sorted(df["n70"].dropna().unique())
    ok = df[df["status"] == "ok"]
    refs = donor_losses(df) if value in ("val_loss", "val_loss_before") else {}
    gap_column = {"val_loss": "gap_closed", "val_loss_before": "gap_closed_before"}.get(value)
    scale = [ok[value].min(), ok[value].max(), *(v for v in refs.values() if not math.isnan(v))]
    margin = 0.03 * (max(scale) - min(scale))  # so that a donor line at the end of the scale stays visible
    vmin, vmax = min(scale) - margin, max(scale) + margin
    fig, axes = plt.subplots(1, max(1, len(adapters)), figsize=(3.2 + 2.6 * len(adapters), 0.6 * len(n8s) + 2.4), squeeze=False)
    image = None
    for ax, adapter in zip(axes[0], adapters):
        grid = np.full((len(n8s), len(n70s)), np.nan)
        gaps = np.full((len(n8s), len(n70s)), np.nan)
        sub = df[df["adapter"] == adapter]
        for _, row in sub.iterrows():
            i, j = n8s.index(row["n8"]), n70s.index(row["n70"])
            if row["status"] == "ok":
                grid[i, j] = row[value]
                gaps[i, j] = row[gap_column] if gap_column else np.nan
            else:
                ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=12)
        image = ax.imshow(grid, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        for i in range(len(n8s)):
            for j in range(len(n70s)):
                if not np.isnan(grid[i, j]):
                    text = f"{grid[i, j]:.3f}" + (f"\ngap {gaps[i, j]:+.2f}" if not np.isnan(gaps[i, j]) else "")
                    ax.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(n70s)), [str(int(v)) for v in n70s])
        ax.set_yticks(range(len(n8s)), [str(int(v)) for v in n8s])
        ax.set_xlabel("n70 (last layers of the large donor)")
        ax.set_ylabel("n8 (first layers of the small donor)")
        ax.set_title(f"{value}, {adapter} adapter")
    if image is not None:
        colorbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label=value)
        _draw_reference_lines(colorbar.ax, refs, lw=2.5)
        if any(not math.isnan(v) for v in refs.values()):  # the donors' lines named below the panels, clear of the colour bar
            fig.legend(*colorbar.ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2,
                       fontsize=7, frameon=False)
    if out is not None:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    return fig


def _large_donor_flops(df: pd.DataFrame) -> float:
    """The large donor's training FLOPs per token over a sweep's runs (each run's FLOPs over its fraction of the
    large donor's, :func:`stitching_costs`; the median), NaN where the runs' results.json do not give it."""
    if df.empty or "run_dir" not in df:
        return math.nan
    large = df["flops_per_token"] / stitching_costs(df)["flops_fraction"]
    large = large[large.map(lambda v: isinstance(v, float) and math.isfinite(v) and v > 0)]
    return float(large.median()) if not large.empty else math.nan


def plot_pareto(df: pd.DataFrame, x: str = "flops_per_token", y: str = "val_loss", *,
                out: str | os.PathLike[str] | None = None):
    """``y`` against ``x`` for every finished run, coloured by adapter, the Pareto front joined; for a loss,
    the donors' losses on the same validation blocks as dashed reference lines and, against training FLOPs per
    token, each donor as a star at its own training cost (the small one at its fraction of the large one's, the
    large at 1; the top axis gives the fractions). The legend sits below the axes."""
    import matplotlib.pyplot as plt  # headless machines get Agg by themselves; notebooks keep inline

    ok = df[(df["status"] == "ok") & df[x].notna() & df[y].notna()]
    front = ok[pareto_front(ok, x, y)].sort_values(x)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for adapter, sub in ok.groupby("adapter"):
        ax.scatter(sub[x], sub[y], label=f"{adapter} adapter", s=36)
        for _, row in sub.iterrows():
            ax.annotate(f"{int(row['n8'])}+{int(row['n70'])}", (row[x], row[y]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.step(front[x], front[y], where="post", color="black", lw=1, label="Pareto front")
    ax.scatter(front[x], front[y], facecolors="none", edgecolors="black", s=110, lw=1.2)
    if y in ("val_loss", "val_loss_before"):
        refs = donor_losses(df)
        _draw_reference_lines(ax, refs)
        large = _large_donor_flops(ok) if x == "flops_per_token" else math.nan
        if not math.isnan(large):  # the donors at their own training cost, and the axis as fractions of the large one's
            _draw_donor_points(ax, refs, donor_costs(ok), scale=large)
            top = ax.secondary_xaxis("top", functions=(lambda v: v / large, lambda f: f * large))
            top.set_xlabel("/ the large donor's training FLOPs per token", fontsize=8)
    ax.set_xlabel({"flops_per_token": "training FLOPs per token", "params": "parameters"}.get(x, x))
    ax.set_ylabel(y)
    ax.set_title("labels: n8+n70", fontsize=9)
    # below the axes: a legend inside them hid points (and the donors' stars at the edges)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if out is not None:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    return fig


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike[str], *, figures: bool = True) -> dict[str, Path]:
    """``summary.csv``, ``summary.md`` and (with ``figures``) ``heatmap.png``, ``pareto.png`` in ``out_dir``."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "summary.csv", "markdown": out_dir / "summary.md"}
    df.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(f"{reference_summary(df)}\n\n{summary_table(df, markdown=True)}\n")
    if figures and (df["status"] == "ok").any():
        paths["heatmap"], paths["pareto"] = out_dir / "heatmap.png", out_dir / "pareto.png"
        plt.close(plot_heatmaps(df, out=paths["heatmap"]))
        plt.close(plot_pareto(df, out=paths["pareto"]))
        if harness_summary_columns(df):
            paths["harness_heatmap"] = out_dir / "harness_heatmap.png"
            plt.close(plot_harness_heatmaps(df, out=paths["harness_heatmap"]))
    return paths


# ---------------------------------------------------------------------- downstream tasks (eval.harness)
def harness_columns(scores: dict[str, dict[str, Any]], references: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """A run's downstream scores as flat columns.

    ``scores``: results.json's ``metrics.harness`` (``{task: {metric: value, <metric>_stderr: ...}}``);
    ``references``: ``{"small": scores, "large": scores}`` of the donors. Gives ``<task>/<metric>``,
    ``<task>/<metric>_stderr``, ``<task>/<metric>:small``, ``:large``, ``:separates_donors`` (the donors differ by
    more than 2 standard errors of their difference, :func:`splitllama.harness.donor_separation`) and
    ``:gap_closed``, NaN where the task does not separate the donors (or the large one scores lower): a split
    between two donors the task cannot tell apart has no place between them.
    """
    from .harness import donor_separation

    references = references or {}
    columns: dict[str, Any] = {}
    for task, row in scores.items():
        for metric, value in row.items():
            columns[f"{task}/{metric}"] = math.nan if value is None else value
            if metric.endswith("_stderr"):
                continue
            refs = {which: (ref.get(task) or {}).get(metric) for which, ref in references.items()}
            for which, value_ref in refs.items():
                columns[f"{task}/{metric}:{which}"] = math.nan if value_ref is None else value_ref
            if "small" in refs and "large" in refs:
                separation = donor_separation(row, references["small"].get(task) or {}, references["large"].get(task) or {}, metric)
                separates = separation["separates_donors"]
                columns[f"{task}/{metric}:separates_donors"] = math.nan if separates is None else separates
                closed = separation["gap_closed"]
                columns[f"{task}/{metric}:gap_closed"] = math.nan if closed is None else closed
    return columns


def separates_donors(df: pd.DataFrame, column: str) -> bool | None:
    """Whether the downstream score ``column`` (``<task>/<metric>``) separates the donors in this sweep (its
    ``:separates_donors`` column; the donors' scores are the same in every run); ``None``: not known (no donors scored)."""
    flags = df.get(f"{column}:separates_donors")
    if flags is None or not flags.notna().any():
        return None
    return bool(flags.dropna().astype(bool).any())


def harness_signal_summary(df: pd.DataFrame) -> str | None:
    """One line per downstream task that does not separate the donors (:func:`separates_donors`): why the summary
    table leaves it out and the harness heatmap marks it. ``None`` when every task separates them, or none was scored."""
    lines = []
    for column in harness_summary_columns(df):
        if separates_donors(df, column) is False:
            donors = [f"{which} {df[f'{column}:{which}'].dropna().iloc[0]:.3f}" for which in ("small", "large")
                      if f"{column}:{which}" in df and df[f"{column}:{which}"].notna().any()]
            lines.append(f"{column}: the donors ({', '.join(donors)}) differ by less than 2 standard errors of their "
                         "difference: the task does not separate them, so it is left out of the table and has no gap closed")
    return "\n".join(lines) or None


def _harness_from_logged(summary: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """``harness/<task>/<metric>`` (and ``harness_small/...``, ``harness_large/...``) logger keys
    back into the nested scores :func:`harness_columns` takes."""
    scores: dict[str, dict[str, Any]] = {}
    references: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in summary.items():
        prefix, _, rest = str(key).partition("/")
        task, _, metric = rest.rpartition("/")
        if not task or not prefix.startswith("harness"):
            continue
        target = scores if prefix == "harness" else references.setdefault(prefix.removeprefix("harness_"), {})
        target.setdefault(task, {})[metric] = value
    return scores, references


def _extra_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns beyond COLUMNS that some row has (the downstream tasks), sorted."""
    return sorted({key for row in rows for key in row} - set(COLUMNS))


def harness_summary_columns(df: pd.DataFrame) -> list[str]:
    """Each task's headline score column: ``<task>/acc`` where the task has one, else its first metric."""
    tasks: dict[str, list[str]] = {}
    for column in df.columns:
        task, slash, metric = str(column).rpartition("/")
        if slash and ":" not in metric and not metric.endswith("_stderr") and column not in COLUMNS:
            tasks.setdefault(task, []).append(metric)
    return [f"{task}/{'acc' if 'acc' in metrics else metrics[0]}" for task, metrics in sorted(tasks.items())]


def plot_harness_heatmaps(df: pd.DataFrame, *, adapter: str | None = None, out: str | os.PathLike[str] | None = None):
    """One heatmap per downstream task of its headline score over (n8 rows, n70 columns), for one
    adapter (the most common one by default); each panel's title gives the donors' scores. A task that does not
    separate the donors (:func:`separates_donors`) is drawn in greys, its title saying so in red."""
    import matplotlib.pyplot as plt
    import numpy as np

    columns = harness_summary_columns(df)
    adapter = adapter or (df["adapter"].mode().iloc[0] if df["adapter"].notna().any() else None)
    sub = df[(df["adapter"] == adapter) & (df["status"] == "ok")] if adapter is not None else df[df["status"] == "ok"]
    n8s, n70s = sorted(df["n8"].dropna().unique()), sorted(df["n70"].dropna().unique())
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(1.2 + 3.4 * max(1, len(columns)), 0.6 * len(n8s) + 2.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        grid = np.full((len(n8s), len(n70s)), np.nan)
        for _, row in sub.iterrows():
            grid[n8s.index(row["n8"]), n70s.index(row["n70"])] = row[column]
        separated = separates_donors(df, column) is not False
        image = ax.imshow(grid, cmap="viridis" if separated else "Greys", aspect="auto", origin="lower")
        for i in range(len(n8s)):
            for j in range(len(n70s)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
        refs = [f"{which} {sub[f'{column}:{which}'].dropna().iloc[0]:.3f}" for which in ("small", "large")
                if f"{column}:{which}" in sub and sub[f"{column}:{which}"].notna().any()]
        ax.set_xticks(range(len(n70s)), [str(int(v)) for v in n70s])
        ax.set_yticks(range(len(n8s)), [str(int(v)) for v in n8s])
        ax.set_xlabel("n70")
        ax.set_ylabel("n8")
        ax.set_title(f"{column}\n{adapter} adapter" + (f"; donors: {', '.join(refs)}" if refs else "")
                     + ("" if separated else "\nDOES NOT SEPARATE THE DONORS (within 2 standard errors)"), fontsize=8,
                     color="black" if separated else "tab:red")
        fig.colorbar(image, ax=ax, shrink=0.85)
    if out is not None:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    return fig


def stitching_series(df: pd.DataFrame) -> pd.Series:
    """Each run's series in a stitching study: adapter init, plus what trained beyond the adapter
    (``lstsq``, ``random``, ``lstsq + last``), and the objective where it is not the next-token loss
    (``lstsq + last, distill``)."""
    extra = df["finetune"].fillna("").map(lambda f: " + ".join(p for p in f.split("+") if p and p != "adapter"))
    series = df["init"].fillna("random") + extra.map(lambda e: f" + {e}" if e else "")
    if "objective" in df:
        series = series + df["objective"].fillna("lm").map(lambda o: "" if o == "lm" else f", {o}")
    return series


#: the donor shape keys of ``donors.embedded.<which>`` and the ``config.json`` keys they stand for
_DONOR_SHAPE_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                     "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size"}


def _donor_shape(results: dict[str, Any], which: str) -> dict[str, int] | None:
    """A donor's shape (:data:`_DONOR_SHAPE_KEYS`): from the run's ``donors.embedded.<which>`` config,
    else from the ``config.json`` at the donor path the run scored (``references.<which>.path``)."""
    embedded = (((results.get("config") or {}).get("donors") or {}).get("embedded") or {}).get(which) or {}
    if all(embedded.get(k) is not None for k in _DONOR_SHAPE_KEYS):
        return {k: int(embedded[k]) for k in _DONOR_SHAPE_KEYS}
    path = (((results.get("references") or {}).get(which)) or {}).get("path")
    config_file = Path(path) / "config.json" if path else None
    if config_file is None or not config_file.is_file():
        return None
    hf = json.loads(config_file.read_text())
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    return {k: int(hf[hf_key]) for k, hf_key in _DONOR_SHAPE_KEYS.items()}


def donor_train_flops_per_token(shape: dict[str, int], vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of a whole donor, counted as the split's are
    (:func:`splitllama.training.module.count_flops_per_token`: 6 x matmul parameters with the LM head,
    plus 6 x seq x attention width per layer), so a split's cost and each donor's share one scale."""
    from types import SimpleNamespace

    from .flops import layer_matmul_params

    layer = SimpleNamespace(hidden_size=shape["hidden_size"], head_dim=shape["head_dim"], num_attention_heads=shape["num_heads"],
                            num_key_value_heads=shape["num_kv_heads"], intermediate_size=shape["intermediate_size"])
    matmul = shape["num_layers"] * layer_matmul_params(layer) + shape["hidden_size"] * vocab_size
    return 6.0 * matmul + 6.0 * seq_len * shape["num_layers"] * shape["num_heads"] * shape["head_dim"]


def _run_costs(run_dir: str | os.PathLike[str]) -> dict[str, float]:
    """One run's training FLOPs per token (``flops_fraction``) and the small donor's
    (``small_flops_fraction``), both as fractions of the large donor's, from its ``results.json``."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return {"flops_fraction": math.nan, "small_flops_fraction": math.nan, "fit_s": math.nan}
    results = json.loads(path.read_text())
    config, flops = results.get("config") or {}, results.get("flops") or {}
    vocab = ((config.get("donors") or {}).get("embedded") or {}).get("vocab_size")
    seq_len = (config.get("data") or {}).get("seq_len")
    shapes = {which: _donor_shape(results, which) for which in ("small", "large")}
    if vocab is None:  # not an embedded donor: the vocabulary of the donor's config.json
        ref = ((results.get("references") or {}).get("large") or {}).get("path")
        vocab = json.loads((Path(ref) / "config.json").read_text())["vocab_size"] if ref and (Path(ref) / "config.json").is_file() else None

    def own(which: str) -> float:
        return donor_train_flops_per_token(shapes[which], vocab, seq_len) if shapes[which] and vocab and seq_len else math.nan

    large = _number(flops.get("large_donor_train_flops_per_token"))
    large = own("large") if math.isnan(large) else large
    return {"flops_fraction": _number(flops.get("train_flops_per_token")) / large, "small_flops_fraction": own("small") / large,
            "fit_s": _number((results.get("timings") or {}).get("fit_s"))}


def stitching_costs(df: pd.DataFrame) -> pd.DataFrame:
    """Per run (rows as ``df``): ``flops_fraction``, its training FLOPs per token as a fraction of the
    large donor's, ``small_flops_fraction``, the small donor's own as the same fraction, and ``fit_s``,
    its training's wall time (NaN where the run's ``results.json`` is not at its ``run_dir``)."""
    return pd.DataFrame([_run_costs(d) for d in df["run_dir"]], index=df.index, columns=["flops_fraction", "small_flops_fraction", "fit_s"])


#: the columns of :func:`stitching_runs`
STITCHING_RUN_COLUMNS = ["series", "n8", "n70", "seed", "val_loss_before", "val_loss", "gap_closed", "small_tuned_val_loss",
                         "large_tuned_val_loss", "gap_closed_tuned", "flops_fraction", "fit_s"]


def stitching_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run of a stitching study (:data:`STITCHING_RUN_COLUMNS`), ordered by
    series, n8, n70 and seed: the per-run data behind :func:`stitching_curve`, e.g. for a CSV."""
    ok = df[df["status"] == "ok"]
    runs = ok.assign(series=stitching_series(ok), **stitching_costs(ok)[["flops_fraction", "fit_s"]])
    runs = runs.assign(**{c: math.nan for c in STITCHING_RUN_COLUMNS if c not in runs})
    return runs[STITCHING_RUN_COLUMNS].sort_values(["series", "n8", "n70", "seed"]).reset_index(drop=True)


def donor_costs(df: pd.DataFrame) -> dict[str, float]:
    """Each donor's training FLOPs per token as a fraction of the large donor's (the large one: 1)."""
    small = stitching_costs(df)["small_flops_fraction"]
    return {"small": float(small.median()) if small.notna().any() else math.nan, "large": 1.0}


def stitching_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each (series, n8, n70) point of a stitching study.

    Columns: ``series``, ``n8``, ``n70``, ``seeds`` (finished runs), ``flops_fraction`` (training
    FLOPs per token as a fraction of the large donor's; the seeds share it), then ``<metric>_mean``
    and ``<metric>_std`` for ``val_loss_before``, ``val_loss``, ``gap_closed_before``, ``gap_closed``
    and, where the runs trained their donors alike, ``gap_closed_tuned`` (the std of one seed is NaN).
    Failed runs are left out; ``summary_table`` lists them.
    """
    metrics = ["val_loss_before", "val_loss", "gap_closed_before", "gap_closed"]
    if "gap_closed_tuned" in df and df["gap_closed_tuned"].notna().any():
        metrics.append("gap_closed_tuned")
    ok = df[df["status"] == "ok"].assign(series=stitching_series)
    ok = ok.assign(flops_fraction=stitching_costs(ok)["flops_fraction"])
    grouped = ok.groupby(["series", "n8", "n70"])[metrics]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "flops_fraction", ok.groupby(["series", "n8", "n70"])["flops_fraction"].mean())
    table.insert(0, "seeds", ok.groupby(["series", "n8", "n70"])["seed"].nunique())
    return table.reset_index().sort_values(["n8", "series", "n70"]).reset_index(drop=True)


def stitching_curve_table(curve: pd.DataFrame) -> str:
    """:func:`stitching_curve` as a Markdown table of ``mean ± std`` cells (``flops`` is the
    training FLOPs per token as a fraction of the large donor's)."""
    columns = ["series", "n8", "n70", "seeds", "flops", "val_loss_before", "val_loss", "gap_closed_before", "gap_closed"]
    if "gap_closed_tuned_mean" in curve:
        columns.append("gap_closed_tuned")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in curve.iterrows():
        cells = [str(row["series"]), str(row["n8"]), str(row["n70"]), str(row["seeds"]), _fmt(row["flops_fraction"])]
        for metric in columns[5:]:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append(_fmt(mean) if math.isnan(std) else f"{mean:.3f} ± {std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draw_donor_points(ax: Any, refs: dict[str, float], costs: dict[str, float], scale: float = 1.0) -> None:
    """Each donor as a point at its own cost and loss; ``costs``: FLOPs fractions of the large donor's, drawn at
    ``fraction * scale`` (1: an axis of fractions; the large donor's FLOPs per token: an axis of FLOPs)."""
    for which, color in (("small", "tab:red"), ("large", "tab:green")):
        if not (math.isnan(refs.get(which, math.nan)) or math.isnan(costs.get(which, math.nan))):
            ax.plot([costs[which] * scale], [refs[which]], marker="*", ms=13, color=color, ls="none",
                    label=f"{which} donor at its cost ({costs[which]:.2f}x the large donor's FLOPs)")
        if not (math.isnan(refs.get(f"{which}_tuned", math.nan)) or math.isnan(costs.get(which, math.nan))):
            ax.plot([costs[which] * scale], [refs[f"{which}_tuned"]], marker="P", ms=11, color=color, ls="none",
                    label=f"{which} donor trained alike, at its cost")


def plot_stitching_curve(df: pd.DataFrame, *, out: str | os.PathLike[str] | None = None):
    """Top row: the split's validation loss against n70, one panel per n8, one line per series (mean
    over seeds, bars: std); dotted, the same series before training; dashed, the two donors.
    Bottom row: the same points against their training FLOPs per token as a fraction of the large
    donor's, with each donor also a star at its own cost, so the quality/cost front shows."""
    import matplotlib.pyplot as plt

    curve = stitching_curve(df)
    refs, costs = donor_losses(df), donor_costs(df)
    n8s = sorted(curve["n8"].unique())
    ncols = max(1, len(n8s))
    fig, axes = plt.subplots(2, ncols, figsize=(5.6 * ncols, 8.8), squeeze=False, sharey="row")
    # red and green are the donors'
    colours = dict(zip(sorted(curve["series"].unique()), ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]))
    for column, n8 in enumerate(n8s):
        for row, x in ((0, "n70"), (1, "flops_fraction")):
            ax = axes[row][column]
            starts_drawn: set[tuple[float, ...]] = set()
            for series, sub in curve[curve["n8"] == n8].groupby("series"):
                colour = colours[series]
                ax.errorbar(sub[x], sub["val_loss_mean"], yerr=sub["val_loss_std"].fillna(0), marker="o", capsize=3,
                            color=colour, label=f"{series}: trained")
                start = tuple(sub["val_loss_before_mean"].round(4))
                if row == 0 and start not in starts_drawn:  # before training (series sharing an init share it: drawn once)
                    starts_drawn.add(start)
                    init = series.split(" + ")[0].split(",")[0]
                    ax.plot(sub[x], sub["val_loss_before_mean"], ls=":", marker=".", color=colour, label=f"{init} init: before training")
            _draw_reference_lines(ax, refs)
            ax.grid(alpha=0.3)
        axes[0][column].set_xticks(sorted(curve["n70"].unique()))
        axes[0][column].set_xlabel("n70 (large-donor layers used)")
        axes[0][column].set_title(f"n8 = {n8} small-donor layers")
        _draw_donor_points(axes[1][column], refs, costs)
        axes[1][column].set_xlim(0, 1.05 * max(1.0, float(curve["flops_fraction"].max())) if curve["flops_fraction"].notna().any() else None)
        axes[1][column].set_xlabel("training FLOPs per token / the large donor's")
        axes[1][column].set_title(f"n8 = {n8}: loss against cost (y: the trained losses)", fontsize=9)
    # the cost row zooms on the trained points and the donors: the front is there, not in the random starts
    low = min(curve["val_loss_mean"].min(), *(v for v in refs.values() if not math.isnan(v)))
    axes[1][0].set_ylim(low - 0.15, curve["val_loss_mean"].max() + 0.3)
    for row in axes:
        row[0].set_ylabel("validation loss (nats/token)")
    # one legend for the figure, below the panels (a legend inside a panel hides its points)
    labelled: dict[str, Any] = {}
    for ax in (axes[0][-1], axes[1][-1]):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.suptitle("split validation loss vs large-donor layers and vs cost (mean ± std over seeds)", fontsize=10)
    fig.legend(list(labelled.values()), list(labelled), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.018 * math.ceil(len(labelled) / 3), 1, 1))
    if out is not None:
        fig.savefig(out, dpi=120)
    return fig


def quality_cost_front(curve: pd.DataFrame, refs: dict[str, float], costs: dict[str, float]) -> pd.DataFrame:
    """Every model of a stitching study on one quality/cost plane: each (series, n8, n70) point of
    :func:`stitching_curve` (mean loss over seeds) and each donor, as shipped and trained alike (at its own
    cost), with ``on_front``: no other model is at most as costly and strictly better (lower loss), or
    strictly cheaper and at most as lossy. ``against_tuned``: the front computed with the donors trained
    alike only (the references a split must beat), which is the one that says whether splitting pays."""
    rows = [{"model": f"{r['series']} n8={r['n8']} n70={r['n70']}", "kind": "split", "flops_fraction": r["flops_fraction"],
             "val_loss": r["val_loss_mean"]} for _, r in curve.iterrows()]
    for which in ("small", "large"):
        for suffix, label in (("", "as shipped"), ("_tuned", "trained alike")):
            value = refs.get(f"{which}{suffix}", math.nan)
            if not math.isnan(value) and not math.isnan(costs.get(which, math.nan)):
                rows.append({"model": f"{which} donor {label}", "kind": f"donor{suffix or '_shipped'}",
                             "flops_fraction": costs[which], "val_loss": value})
    table = pd.DataFrame(rows).assign(status="ok")  # pareto_front's dominance rule, on every model of the plane
    table["on_front"] = pareto_front(table, "flops_fraction", "val_loss")
    against = table[table["kind"] != "donor_shipped"]
    table["against_tuned"] = pareto_front(against, "flops_fraction", "val_loss").reindex(table.index, fill_value=False)
    table = table.drop(columns="status")
    return table.sort_values(["flops_fraction", "val_loss"]).reset_index(drop=True)


def iter_sweep_dirs(root: str | os.PathLike[str]) -> Iterable[Path]:
    """Sweep directories under a ``multirun/`` root, newest last."""
    return sorted(p for p in Path(root).glob("*/*") if p.is_dir())


__all__ = ["COLUMNS", "REFERENCE_COLUMNS", "donor_losses", "harness_columns", "harness_summary_columns", "iter_sweep_dirs",
           "plot_harness_heatmaps", "load_sweep", "load_wandb", "pareto_front",
           "donor_costs", "donor_train_flops_per_token", "plot_stitching_curve", "stitching_costs", "stitching_curve",
           "stitching_curve_table", "stitching_runs", "stitching_series", "STITCHING_RUN_COLUMNS",
           "plot_heatmaps", "plot_pareto", "quality_cost_front", "reference_summary", "reference_values", "run_row", "summary_table", "write_report"]
