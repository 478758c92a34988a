"""How a task ends: the run directory claimed, the task run, ``results.json`` written for every way it ends.

:func:`execute` is the body of ``run.py``'s ``main``: it claims the run directory (a used one is refused
unless the run resumes it; one live process at a time), checks that the output directories it will write
are its own (:func:`~splitllama.results.output_refusal`), records the settings that defeat part of
themselves (``warnings``), runs the task, and records the outcome: ``ok``, ``interrupted`` (Ctrl-C,
SIGTERM: training stops with a checkpoint; exit 130 / 143), ``diverged`` (the loss became non-finite:
the step and the last finite loss, nothing exported; exit :data:`~splitllama.results.DIVERGED_EXIT_STATUS`,
3) or ``failed`` (the error; exit 1). In a multirun a diverged or failed job returns +inf, the worst trial,
and the sweep goes on. What it returns is what a Hydra sweeper optimises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

from omegaconf import DictConfig

from ..configuration_split_llama import SplitConfigError
from ..errors import RunConfigError
from ..results import (DIVERGED_EXIT_STATUS, RunAlreadyComplete, RunDirInUse, RunDiverged, RunInterrupted, RunRecord, RunSignals, claim_output, is_first_rank,
                       outcome_line, output_refusal, resumes_run)
from .resume import last_checkpoint
from .schema import SweepObjective
from .settings import config_dict, plain, setting_warnings, written_paths
from .trainer import apply_cpu_threads

logger = logging.getLogger("splitllama.run")

#: a task: ``(cfg, record) -> validation loss`` (or ``None`` when the task has none)
Task = Callable[[DictConfig, RunRecord], "float | None"]


def sweep_value(cfg: DictConfig, val_loss: float | None, flops: dict) -> float | list[float] | None:
    """What a Hydra sweeper sees (``sweep.objective``): the validation loss, the loss penalised
    for exceeding ``sweep.flops_budget`` training FLOPs per token, or [loss, GFLOPs per token]."""
    objective = cfg.sweep.objective
    if val_loss is not None and not math.isfinite(val_loss):
        val_loss = math.inf  # the worst trial: Optuna's sweeper aborts a study on nan
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
            resume = resumes_run(cfg.ckpt_path)
            record.claim(resume=resume, hint=", or resume it with ckpt_path=last" if task == "train" and not resume else "")
        except RunDirInUse as exc:
            raise SystemExit(f"error: {exc}") from None
        signals.install()
    try:
        with record.executing(cfg):
            return _run_task(cfg, tasks[task], record, rank_zero)
    except RunAlreadyComplete as exc:  # nothing to do: results.json stays the finished run's
        if rank_zero:
            logger.info("%s", exc)
        return sweep_value(cfg, (exc.previous.get("metrics") or {}).get("val_loss"), exc.previous.get("flops") or {})
    except RunDiverged as exc:
        return _diverged(cfg, record, exc, rank_zero)
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
                if checkpoint is not None:
                    logger.error("interrupted by %s; %s records it; resume with ckpt_path=last hydra.run.dir=%s (checkpoint %s)",
                                 record.data["interrupted_by"], path, cfg.paths.output_dir, checkpoint)
                else:
                    logger.error("interrupted by %s before the first checkpoint; %s records it; there is nothing to resume: "
                                 "start again as a new run (the same command without hydra.run.dir), or delete %s and rerun "
                                 "the same command", record.data["interrupted_by"], path, cfg.paths.output_dir)
            raise SystemExit(143 if signals.received == "SIGTERM" else 130) from None
        record.fail(exc)
        if rank_zero:
            _write_ending(record)
        if not isinstance(exc, Exception):
            raise
        if is_multirun():  # record the failure and let the sweep go on
            logger.error("run failed (%s: %s); results.json records it", type(exc).__name__, exc)
            # +inf, not nan: a failed job is the worst trial (Optuna's sweeper aborts the study on nan)
            return sweep_value(cfg, math.inf, {"train_flops_per_token": math.inf})
        if isinstance(exc, (RunConfigError, SplitConfigError)):
            raise SystemExit(f"error: {exc}") from None
        raise
    finally:
        record.release()


def _run_task(cfg: DictConfig, task: Task, record: RunRecord, rank_zero: bool) -> float | list[float] | None:
    """The task itself, between the checks that need no work (output directories, settings) and ``results.json``."""
    record.update("paths", {"hydra_config": str(Path(cfg.paths.output_dir) / config_subdir())})
    if rank_zero:
        check_outputs(cfg, record)
        for message in setting_warnings(cfg):
            record.warn(message)
    threads = apply_cpu_threads(cfg)
    if threads is not None:
        record.data["cpu_threads"] = threads
    metric = task(cfg, record)
    status = "interrupted" if record.data.get("interrupted") else "ok"
    if rank_zero:
        path = record.write(status)
        logger.info("%s: %s", status, path)
        summary = outcome_line(record.data)
        if summary:
            logger.info("%s", summary)
    return sweep_value(cfg, metric, record.data.get("flops", {}))


def check_outputs(cfg: DictConfig, record: RunRecord) -> None:
    """One writer per run: each output directory the task writes (:func:`~splitllama.run.settings.written_paths`) lies
    in the run's own directory or in a place no other run's record names (:func:`~splitllama.results.output_refusal`);
    one outside is marked as this run's (:func:`~splitllama.results.claim_output`). Before any work."""
    written = written_paths(cfg)
    for key, path in written.items():
        refusal = output_refusal(path, record.run_dir, key)
        if refusal:
            raise RunConfigError(refusal)
    for path in written.values():
        claim_output(path, record.run_dir)


def _write_ending(record: RunRecord, status: str | None = None) -> None:
    try:
        record.write(status)
    except OSError as write_error:  # a full disk: the temporary file is gone, the error is in the log
        error = record.data.get("error") or {}
        logger.error("could not write results.json (%s) to record: %s: %s", write_error, error.get("type"), error.get("message"))


def _diverged(cfg: DictConfig, record: RunRecord, exc: RunDiverged, rank_zero: bool) -> float | list[float] | None:
    """A loss that became non-finite: ``status: diverged`` with the step and the last finite loss; exit 3, or +inf to a sweep."""
    record.fail(exc)
    record.data["diverged"] = exc.details
    if exc.details.get("step") is not None:
        record.update("metrics", {"steps": exc.details["step"]})
    if rank_zero:
        _write_ending(record, "diverged")
        logger.error("%s; results.json records it (status: diverged)", exc)
    if is_multirun():  # the sweep goes on: a diverged job is its worst trial
        return sweep_value(cfg, math.inf, {"train_flops_per_token": math.inf})
    raise SystemExit(DIVERGED_EXIT_STATUS) from None


__all__ = ["Task", "check_outputs", "config_subdir", "execute", "is_multirun", "sweep_value"]
