"""How a task ends: the run directory claimed, the task run, ``results.json`` written for every way it ends.

:func:`execute` is the body of ``run.py``'s ``main``: it claims the run directory (a used one is refused
unless the run resumes it), runs the task, and records the outcome: ``ok``, ``interrupted`` (Ctrl-C,
SIGTERM: training stops with a checkpoint; exit 130 / 143) or ``failed`` (the error, and in a multirun
the sweep goes on with this job as its worst trial). What it returns is what a Hydra sweeper optimises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

from omegaconf import DictConfig

from ..configuration_split_llama import SplitConfigError
from ..errors import RunConfigError
from ..results import RunDirInUse, RunInterrupted, RunRecord, RunSignals, is_first_rank, outcome_line, resumes_run
from .resume import last_checkpoint
from .schema import SweepObjective
from .settings import config_dict, plain
from .trainer import apply_cpu_threads

logger = logging.getLogger("splitllama.run")

#: a task: ``(cfg, record) -> validation loss`` (or ``None`` when the task has none)
Task = Callable[[DictConfig, RunRecord], "float | None"]


def sweep_value(cfg: DictConfig, val_loss: float | None, flops: dict) -> float | list[float] | None:
    """What a Hydra sweeper sees (``sweep.objective``): the validation loss, the loss penalised
    for exceeding ``sweep.flops_budget`` training FLOPs per token, or [loss, GFLOPs per token]."""
    objective = cfg.sweep.objective
    if val_loss is None or objective == SweepObjective.val_loss:
        return val_loss
    train_flops = flops.get("train_flops_per_token", float("nan"))
    if objective == SweepObjective.penalised:
        return val_loss + cfg.sweep.penalty * max(0.0, train_flops / cfg.sweep.flops_budget - 1.0)
    return [val_loss, train_flops / 1e9]


def is_multirun() -> bool:
    """This job is one of a Hydra multirun (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def config_subdir() -> str:
    """Where Hydra wrote this attempt's composed config (``.hydra``, or ``.hydra/attempt-<n>`` on a resume)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().output_subdir)


def execute(cfg: DictConfig, tasks: Mapping[str, Task], signals: RunSignals, *, repo_dir: Path) -> float | list[float] | None:
    """Run ``tasks[cfg.task.name]`` in its claimed run directory and record how it ended (see the module)."""
    task = plain(cfg.task.name)
    rank_zero = is_first_rank()
    record = RunRecord(cfg.paths.output_dir, task=task, config=config_dict(cfg), repo_dir=repo_dir)
    if rank_zero:  # other ranks run in the directory rank 0 claimed
        try:
            record.claim(resume=resumes_run(cfg.ckpt_path), hint=", or resume it with ckpt_path=last" if task == "train" else "")
        except RunDirInUse as exc:
            raise SystemExit(f"error: {exc}") from None
        signals.install()
    try:
        record.update("paths", {"hydra_config": str(Path(cfg.paths.output_dir) / config_subdir())})
        threads = apply_cpu_threads(cfg)
        if threads is not None:
            record.data["cpu_threads"] = threads
        metric = tasks[task](cfg, record)
        status = "interrupted" if record.data.get("interrupted") else "ok"
        if rank_zero:
            path = record.write(status)
            logger.info("%s: %s", status, path)
            summary = outcome_line(record.data)
            if summary:
                logger.info("%s", summary)
        return sweep_value(cfg, metric, record.data.get("flops", {}))
    except BaseException as exc:
        if signals.received is not None or isinstance(exc, (KeyboardInterrupt, RunInterrupted)):
            # Ctrl-C (Lightning turns it into SystemExit), SIGTERM (SLURM before a kill), a clean stop on either
            checkpoint = signals.checkpoint or last_checkpoint(cfg)
            record.data["interrupted_by"] = signals.received or type(exc).__name__
            record.update("paths", {"checkpoint": checkpoint})
            if signals.step is not None:
                record.update("metrics", {"steps": signals.step})
            if rank_zero:
                path = record.write("interrupted")
                logger.error("interrupted by %s; %s records it; resume with ckpt_path=last hydra.run.dir=%s (checkpoint %s)",
                             record.data["interrupted_by"], path, cfg.paths.output_dir, checkpoint)
            raise SystemExit(143 if signals.received == "SIGTERM" else 130) from None
        record.fail(exc)
        if rank_zero:
            try:
                record.write()
            except OSError as write_error:  # a full disk: the temporary file is gone, the error is in the log
                logger.error("could not write results.json (%s) to record: %s: %s", write_error, type(exc).__name__, exc)
        if not isinstance(exc, Exception):
            raise
        if is_multirun():  # record the failure and let the sweep go on
            logger.error("run failed (%s: %s); results.json records it", type(exc).__name__, exc)
            # +inf, not nan: a failed job is the worst trial (Optuna's sweeper aborts the study on nan)
            return sweep_value(cfg, math.inf, {"train_flops_per_token": math.inf})
        if isinstance(exc, (RunConfigError, SplitConfigError)):
            raise SystemExit(f"error: {exc}") from None
        raise


__all__ = ["Task", "config_subdir", "execute", "is_multirun", "sweep_value"]
