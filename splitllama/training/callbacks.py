"""Lightning callbacks and logger setup used by run.py."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger

logger = logging.getLogger(__name__)


class StopAfterSteps(pl.Callback):
    """Stop training after ``steps`` optimizer steps, as an interrupted run would.

    The run keeps its full schedule (``trainer.max_steps``); resuming with ``ckpt_path`` finishes
    it. Used to test exact resumption and to split a long run into chunks.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class HangWatchdog(pl.Callback):
    """Fail a stuck run with every thread's stack instead of letting it wait forever.

    Armed when the trainer starts and re-armed at every training and validation batch: if no
    batch starts or ends within ``timeout_s`` seconds (a collective some rank never joins, a
    deadlocked data loader), :mod:`faulthandler` writes all threads' stacks of this process to
    stderr and exits it with status 1. Every rank runs its own watchdog, so a hang over several
    processes leaves each rank's stack. ``trainer.hang_timeout_s`` turns it on (the distributed
    tests do); pick it well above the slowest step and evaluation.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"trainer.hang_timeout_s={timeout_s}: must be > 0 seconds")
        self.timeout_s = float(timeout_s)

    def _arm(self, *_: Any, **__: Any) -> None:
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)

    def _disarm(self, *_: Any, **__: Any) -> None:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()

    setup = _arm
    on_train_batch_start = on_train_batch_end = _arm
    on_validation_batch_start = on_validation_batch_end = _arm
    on_fit_end = on_validation_end = _arm  # what follows a phase (export, counting) is covered too
    teardown = _arm

    def on_exception(self, *_: Any) -> None:
        self._disarm()


def make_loggers(
    kind: str,
    *,
    save_dir: str | os.PathLike[str],
    config: dict[str, Any],
    mode: str = "offline",
    project: str = "splitllama",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    csv: bool = True,
    init_timeout: float = 60.0,
) -> tuple[list[Logger], dict[str, Any]]:
    """Loggers for ``logger.kind`` (``wandb`` | ``csv`` | ``none``) and a note of what happened.

    W&B is offline unless ``mode='online'``. If W&B cannot start (no account, no network, not
    installed), the run goes on with the CSV logger and a warning: logging never fails a run.
    """
    save_dir = Path(save_dir)
    loggers: list[Logger] = []
    info: dict[str, Any] = {"kind": kind}
    if kind == "wandb":
        try:
            loggers.append(_start_wandb(save_dir, config, mode, project, entity, name, group, tags or [], init_timeout))
            info["wandb_mode"] = mode
        except Exception as exc:  # noqa: BLE001 - any W&B failure falls back to CSV
            message = f"W&B ({mode}) could not start ({type(exc).__name__}: {exc}); logging to CSV only"
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
            info["wandb_error"] = f"{type(exc).__name__}: {exc}"
            csv = True
    if kind == "csv" or (kind == "wandb" and csv):
        # csv/version_<n>/metrics.csv: a resumed run in the same directory gets its own file
        loggers.append(CSVLogger(save_dir=str(save_dir), name="csv"))
    return loggers, info


def _start_wandb(
    save_dir: Path, config: dict[str, Any], mode: str, project: str, entity: str | None, name: str | None,
    group: str | None, tags: list[str], init_timeout: float,
) -> Logger:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    elif os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        os.environ.pop("WANDB_MODE")  # the config asks for online
    (save_dir / "wandb").mkdir(parents=True, exist_ok=True)
    wandb_logger = WandbLogger(
        project=project, entity=entity, name=name, group=group, tags=tags, save_dir=str(save_dir),
        offline=mode == "offline", config=config, settings=wandb.Settings(init_timeout=init_timeout, silent=True),
    )
    _ = wandb_logger.experiment  # start now, so a failure happens here and not mid-training
    return wandb_logger


def csv_metrics_file(loggers: list[Logger]) -> str | None:
    """Path of the CSV logger's metrics.csv, if one is active."""
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            return str(Path(lg.log_dir) / "metrics.csv")
    return None


def wandb_run_file(loggers: list[Logger]) -> str | None:
    """Path of the W&B run's transaction log (``run-<id>.wandb``), if a W&B logger is active."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            directory = Path(run.dir).parent  # .../offline-run-<date>-<id>/files -> run directory
            return str(directory / f"run-{run.id}.wandb")
    return None


__all__ = ["StopAfterSteps", "csv_metrics_file", "make_loggers", "wandb_run_file"]
