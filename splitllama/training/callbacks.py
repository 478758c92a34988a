"""Lightning callbacks and logger setup used by run.py."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..results import RunInterrupted, RunSignals, atomic_write

logger = logging.getLogger(__name__)


class GracefulStop(pl.Callback):
    """Stop training with a checkpoint at ``checkpoint_path``: after ``steps`` optimizer steps (an
    interrupted run on purpose, ``task.stop_after_steps``), or on a signal :class:`RunSignals` caught.

    The checkpoint is saved at the end of a training step, where Lightning's own periodic ones are
    saved, so resuming from it continues the run exactly. The run keeps its full schedule
    (``trainer.max_steps``); resuming with ``ckpt_path`` finishes it.
    """

    def __init__(self, checkpoint_path: str | os.PathLike[str], steps: int | None = None, signals: RunSignals | None = None) -> None:
        self.checkpoint_path, self.steps, self.signals = str(Path(checkpoint_path)), steps, signals

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signals is not None:
            self.signals.fitting = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        by_signal = self.signals is not None and self.signals.received is not None
        if by_signal or (self.steps is not None and trainer.global_step >= self.steps):
            self._save(trainer)
            trainer.should_stop = True
            if by_signal:  # Lightning raises SIGTERMException itself on SIGTERM, later; this covers SIGINT too
                self.signals.fitting = False
                raise RunInterrupted(f"{self.signals.received}: stopped at step {trainer.global_step}, saved {self.checkpoint_path}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signals is not None:
            self.signals.fitting = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # SIGTERM during validation or between hooks: Lightning stops at a step boundary (SIGTERMException),
        # where its own checkpoints are saved too; a second Ctrl-C may come mid-step, so it saves nothing
        if isinstance(exception, SIGTERMException) and self.signals is not None and self.signals.step != trainer.global_step:
            self._save(trainer)
        self.on_train_end(trainer, pl_module)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.checkpoint_path)
        if self.signals is not None:
            self.signals.checkpoint, self.signals.step = self.checkpoint_path, trainer.global_step


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, safe on a full disk: each checkpoint is written beside its name and
    renamed when complete (:func:`~splitllama.results.atomic_write`). Lightning's own writer staged it in the
    system's temporary directory and copied it over, so an ENOSPC left half a checkpoint under its real name
    and the staged copy behind, and the space they took kept results.json from recording the failure."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        import io

        import torch

        # serialised in memory first, as Lightning does: torch's zip writer turns a failed write into a
        # RuntimeError ("unexpected pos"), while a plain write raises the OSError (ENOSPC) that happened
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(buffer.getbuffer())


class RecordTrainedResult(pl.Callback):
    """Save what decides the run's result (:func:`~splitllama.run.resume.trained_result`) in every
    checkpoint, under ``key``, so a resume can be checked against it (:func:`~splitllama.run.resume.check_resume`)."""

    def __init__(self, values: dict[str, Any], key: str) -> None:
        self.values, self.key = values, key

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.values


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
    kind, mode = getattr(kind, "name", kind), getattr(mode, "name", mode)  # the schema's enums when instantiated
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


__all__ = ["AtomicCheckpointIO", "GracefulStop", "RecordTrainedResult", "csv_metrics_file", "make_loggers", "wandb_run_file"]
