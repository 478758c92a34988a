"""Hydra callback that closes every ``run.py -m`` sweep with a summary table and figures.

Enabled in ``conf/hydra/default.yaml``. After the last job it loads the sweep directory's
``results.json`` files (failed and diverged jobs included, listed last and left out of the figures) and prints the table, and writes
``summary.csv``, ``summary.md``, ``heatmap.png`` and ``pareto.png`` beside the job folders (and
``harness_heatmap.png`` when the runs scored downstream tasks: a column per task in the table); the
donors' losses on the same validation blocks head the table and are drawn in both figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("splitllama.sweeps")


class SweepSummary(Callback):
    def __init__(self, figures: bool = True) -> None:
        self.figures = figures

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .analysis import load_sweep, reference_summary, summary_table, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = load_sweep(sweep_dir)
        except FileNotFoundError as exc:
            log.warning("no sweep summary: %s", exc)
            return
        try:
            paths = write_report(df, sweep_dir, figures=self.figures)
        except Exception as exc:  # noqa: BLE001 - the jobs ran and recorded themselves; the summary is a view of them
            log.error("no sweep summary (%s: %s); the jobs' results.json files are complete: "
                      "python -c \"from splitllama.analysis import load_sweep; print(load_sweep('%s'))\"", type(exc).__name__, exc, sweep_dir)
            return
        counts = df["status"].value_counts().to_dict()
        print(f"\nsweep {sweep_dir}: {len(df)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())})\n"
              f"{reference_summary(df)}\n{summary_table(df)}\n\nwrote {', '.join(str(p) for p in paths.values())}", flush=True)


__all__ = ["SweepSummary"]
