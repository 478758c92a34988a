"""Lightning callbacks and logger setup used by run.py."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from ..errors import RunConfigError
from ..results import RunDiverged, RunInterrupted, RunSignals, atomic_write

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


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """The names (dotted paths) of the floating-point tensors in ``tree`` (nested dicts and lists, as a
    checkpoint holds them) that hold a NaN or an infinity.

    Read off each tensor's minimum and maximum (a NaN makes both NaN, an infinity is one of them): exact, and on
    a CPU five times faster than ``isfinite(t).all()``, which writes a mask the size of the tensor."""
    import torch

    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor shard: this rank's part
        if not local.is_floating_point() or local.device.type == "meta" or local.numel() == 0:
            return []
        return [] if bool(torch.stack(torch.aminmax(local.detach())).isfinite().all()) else [prefix]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [name for key, value in items for name in nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


#: the parts of a Lightning checkpoint that hold what training learned (weights, optimizer moments)
CHECKPOINT_TENSORS = ("state_dict", "optimizer_states")


def _named(names: list[str]) -> str:
    return f"{len(names)} tensor(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def checkpoint_archive_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with the archive of the torch checkpoint at ``path`` (``None``: it reads whole).

    A torch checkpoint is a zip archive, and ``torch.load`` checks neither that it is complete nor the CRC-32
    its writer stored for each member: bytes changed on disk or in a copy load as other weights (NaN, a
    diverged resume). :func:`splitllama.files.zip_archive_problem` reads every member against its CRC.
    """
    from ..files import zip_archive_problem

    return zip_archive_problem(path, "checkpoint")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, safe on a full disk: each checkpoint is written beside its name and
    renamed when complete (:func:`~splitllama.results.atomic_write`). Lightning's own writer staged it in the
    system's temporary directory and copied it over, so an ENOSPC left half a checkpoint under its real name
    and the staged copy behind, and the space they took kept results.json from recording the failure.

    A checkpoint whose weights or optimizer state hold a NaN or an infinity is not saved (:class:`RunDiverged`:
    ``last.ckpt`` stays the last finite one); on loading (a resume), the archive is checked whole against its
    CRCs (:func:`checkpoint_archive_problem`) and its tensors for non-finite values, each refusal naming the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = nonfinite_tensors({k: checkpoint[k] for k in CHECKPOINT_TENSORS if k in checkpoint})
        if bad:
            step = checkpoint.get("global_step")
            raise RunDiverged(f"training diverged: the checkpoint of step {step} was not saved to {path}: {_named(bad)} hold NaN or "
                              "infinite values; the checkpoints before it are the last finite ones. Lower optim.lr or lengthen "
                              "optim.warmup_steps, and start a new run", step=step, loss=None, where="checkpoint")
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

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        local = "://" not in str(path)
        where = f"ckpt_path: the checkpoint {path}"
        way_out = (f"resume from another .ckpt in {Path(path).parent} (ckpt_path=<that file>), or start a new run (no ckpt_path, "
                   "a new run directory)")
        problem = checkpoint_archive_problem(path) if local and Path(path).is_file() else None
        if problem:
            raise RunConfigError(f"{where} is {problem}; {way_out}")
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        bad = nonfinite_tensors({k: checkpoint[k] for k in CHECKPOINT_TENSORS if k in checkpoint})
        if bad:
            raise RunConfigError(f"{where} holds NaN or infinite values in {_named(bad)}: the run it continues had diverged, "
                                 f"or the file is damaged; {way_out}")
        return checkpoint


class DivergenceGuard(pl.Callback):
    """Stop a run whose loss becomes non-finite, with :class:`~splitllama.results.RunDiverged` (status
    ``diverged``: nothing is exported; run.py exits non-zero, a sweep counts the job as its worst trial).

    Training: after ``patience`` optimizer steps in a row with a non-finite loss (0: at the first; a step is
    non-finite when any of its accumulated batches' loss is). Validation after the first step (during fit,
    or the final pass after it): at once, since a non-finite validation loss scores the weights themselves.
    Weights that became non-finite before a checkpoint is due are caught there too, on every rank. Every
    rank takes part in each decision (one collective per step), so all ranks stop at the same step. Its
    state (the last finite loss) is saved in checkpoints and restored on resume.
    """

    def __init__(self, patience: int = 0) -> None:
        if patience < 0:
            raise RunConfigError(f"trainer.nonfinite_patience={patience}: must be >= 0 (0: stop at the first non-finite step)")
        self.patience = int(patience)
        self.bad_steps = 0
        self.last_finite_step: int | None = None
        self.last_finite_loss: float | None = None
        self._seen_step: int | None = None
        self._step_bad = False
        self._step_loss: float | None = None

    @staticmethod
    def _value(loss: Any) -> float | None:
        if loss is None:
            return None
        return float(loss.detach().float().item()) if hasattr(loss, "detach") else float(loss)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = self._value(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        if loss is not None:
            self._step_bad = self._step_bad or not math.isfinite(loss)
            self._step_loss = loss if self._step_loss is None or math.isfinite(self._step_loss) else self._step_loss
        if trainer.global_step == self._seen_step:  # inside an accumulated step: decide at its optimizer step
            return
        self._seen_step = trainer.global_step
        bad, loss, self._step_bad, self._step_loss = self._step_bad, self._step_loss, False, None
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.bad_steps = 0
            if loss is not None:
                self.last_finite_step, self.last_finite_loss = trainer.global_step, loss
            return
        self.bad_steps += 1
        if self.bad_steps > self.patience:
            self._stop(trainer, "train", loss, f"the training loss has been non-finite for {self.bad_steps} step(s)" if self.patience
                       else "the training loss is non-finite")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step == 0:  # before any training: the assembly's score, not a divergence
            return
        loss = self._value(trainer.callback_metrics.get("val/loss"))
        if trainer.strategy.reduce_boolean_decision(loss is not None and not math.isfinite(loss), all=False):
            self._stop(trainer, "val", loss, "the validation loss is non-finite")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self._stop(trainer, "checkpoint", None, f"the weights hold NaN or infinite values ({_named(bad)})" if bad
                       else "another rank's weights hold NaN or infinite values", saved=False)

    def _stop(self, trainer: pl.Trainer, where: str, loss: float | None, what: str, saved: bool = True) -> None:
        step = trainer.global_step
        lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None
        last = (f"the last finite training loss was {self.last_finite_loss:.4g}, at step {self.last_finite_step}"
                if self.last_finite_step is not None else "no step had a finite training loss")
        at_lr = f" (the learning rate at this step: {lr:.4g})" if lr is not None else ""
        raise RunDiverged(
            f"training diverged at step {step}: {what}{'' if loss is None else f' ({loss})'}; {last}. Nothing is exported"
            f"{'' if saved else ', and this step is not checkpointed'}. Lower optim.lr{at_lr} or lengthen optim.warmup_steps, "
            "and keep trainer.gradient_clip_val set; where only a few steps overflow (16-mixed), trainer.nonfinite_patience=<steps> "
            "lets a run go on through them", step=step, loss=loss, where=where, last_finite_step=self.last_finite_step,
            last_finite_loss=self.last_finite_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"last_finite_step": self.last_finite_step, "last_finite_loss": self.last_finite_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_finite_step, self.last_finite_loss = state_dict.get("last_finite_step"), state_dict.get("last_finite_loss")


class RecordWhatRan(pl.Callback):
    """Record what the Trainer runs with, once its devices are up and the data is set up (its ``setup``, before
    the first step): ``describe(trainer, module)`` gives ``(facts, warnings)``; the facts go to the run record's ``ran``,
    each warning to its ``warnings``. The config says what was asked for; this says what ran (Lightning trains
    ``precision=16`` in bf16-mixed on a CPU, ``devices=auto`` is a number only here)."""

    def __init__(self, record: Any, describe: Callable[[pl.Trainer, pl.LightningModule], tuple[dict[str, Any], list[str]]]) -> None:
        self.record, self.describe = record, describe

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        facts, warned = self.describe(trainer, pl_module)
        self.record.update("ran", facts)
        for message in warned:
            self.record.warn(message)


class RecordTrainedResult(pl.Callback):
    """Save what decides the run's result (:func:`~splitllama.run.resume.trained_result`) in every
    checkpoint, under ``key``, so a resume can be checked against it (:func:`~splitllama.run.resume.check_resume`)."""

    def __init__(self, values: dict[str, Any], key: str) -> None:
        self.values, self.key = values, key

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.values


class LossTrace(pl.Callback):
    """The training loss of each of the first ``steps`` optimiser steps, in ``losses``; with ``stop``, the run
    ends there. A short, exact fingerprint of a training run: two runs with the same weights, data, order,
    schedule and code give the same trace (to float rounding), so checking a long run's first steps catches
    what changed it without paying for the whole run (``tests/test_references.py``)."""

    def __init__(self, steps: int, *, stop: bool = False) -> None:
        self.steps, self.stop, self.losses = steps, stop, []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and len(self.losses) < self.steps and trainer.global_step > len(self.losses):
            self.losses.append(float(loss.detach()))
        if self.stop and len(self.losses) >= self.steps:
            trainer.should_stop = True


def progress_interval(every_n_steps: int | None, max_steps: int) -> int:
    """The steps between two progress lines (:class:`ProgressLog`): ``every_n_steps`` as given (0: none), or for
    ``None`` about :data:`PROGRESS_LINES` lines over the run (600 steps: every 60)."""
    if every_n_steps is None:
        return max(1, math.ceil(max_steps / PROGRESS_LINES)) if max_steps > 0 else 0
    if every_n_steps < 0:
        raise RunConfigError(f"trainer.progress_every_n_steps={every_n_steps}: give a number of steps >= 1, 0 for no "
                             "progress lines, or null for about 10 over the run")
    return int(every_n_steps)


#: how many progress lines a run logs when ``trainer.progress_every_n_steps`` is null
PROGRESS_LINES = 10


def format_duration(seconds: float) -> str:
    """``1:02:03`` (hours, minutes, seconds), ``2:03`` under an hour."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog(pl.Callback):
    """A line through Python logging every ``every_n_steps`` optimizer steps and at the last one, so a long run
    says how it goes in Hydra's ``run.log`` and on stdout alike, with or without a terminal (under nohup or
    SLURM the progress bar shows nothing)::

        step 120/600 (20%): loss 3.214, 6.1k tokens/s, 0:42 elapsed, about 2:48 left (ETA 17:05:12)

    The loss is the mean training loss of the steps since the previous line; tokens/s and the time left are
    measured over the steps this process has trained (a resumed run counts from its resume step). Rank 0 only.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        progress_interval(every_n_steps, 1)  # a negative count fails here, before training
        self.every_n_steps = every_n_steps
        self._interval = 0
        self._started = self._window_started = 0.0
        self._start_step = 0
        self._losses: list[float] = []
        self._tokens = 0
        self._seen_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._interval = progress_interval(self.every_n_steps, int(trainer.max_steps))
        self._started, self._start_step = time.perf_counter(), trainer.global_step
        self._window_started = self._started
        self._seen_step, self._losses, self._tokens = trainer.global_step, [], 0
        if trainer.is_global_zero and self._interval:
            resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
            every = "every step" if self._interval == 1 else f"every {self._interval} steps"
            logger.info("training %d steps%s; a progress line %s (trainer.progress_every_n_steps)", trainer.max_steps, resumed, every)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._interval or not trainer.is_global_zero:
            return
        loss = DivergenceGuard._value(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        if loss is not None:
            self._losses.append(loss)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is not None:
            replicas = pl_module.data_parallel_size() if hasattr(pl_module, "data_parallel_size") else trainer.world_size
            self._tokens += int(ids.numel()) * int(replicas)
        step = trainer.global_step
        if step == self._seen_step:  # inside an accumulated step
            return
        self._seen_step = step
        if step % self._interval == 0 or step >= trainer.max_steps:
            logger.info("%s", self.line(step, int(trainer.max_steps)))

    def line(self, step: int, max_steps: int) -> str:
        """The progress line at ``step``; starts the next window (loss and tokens/s are the window's)."""
        import time

        now = time.perf_counter()
        elapsed, window = now - self._started, now - self._window_started
        done = max(step - self._start_step, 0)
        parts = [f"loss {sum(self._losses) / len(self._losses):.4g}"] if self._losses else []
        if self._tokens and window > 0:
            rate = self._tokens / window
            parts.append(f"{rate / 1000:.1f}k tokens/s" if rate >= 1000 else f"{rate:.0f} tokens/s")
        timing = f"{format_duration(elapsed)} elapsed"
        if done and step < max_steps:
            left = elapsed / done * (max_steps - step)
            timing += f", about {format_duration(left)} left (ETA {time.strftime('%H:%M:%S', time.localtime(time.time() + left))})"
        self._losses, self._tokens, self._window_started = [], 0, now
        return f"step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%): {', '.join([*parts, timing])}"


def _step_description(trainer: pl.Trainer) -> str:
    return f"step {trainer.global_step}/{trainer.max_steps}"


class RichStepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps (:func:`step_progress_bar`)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return _step_description(self.trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps(trainer)

    def _show_steps(self, trainer: pl.Trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None and self.is_enabled:
            self.progress.update(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                                 description=_step_description(trainer))
            self.refresh()


class TQDMStepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps (:func:`step_progress_bar`)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:  # one bar over the run, not one an epoch
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._show_steps(trainer)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _show_steps(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar
        bar.total, bar.n = trainer.max_steps, trainer.global_step
        bar.set_description(_step_description(trainer), refresh=not bar.disable)


def step_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The training progress bar in optimizer steps (``step 120/600``, the bar over ``trainer.max_steps``).

    A run is counted in steps (``max_epochs=-1``); Lightning's own bars count the batches of an epoch and
    label them ``Epoch 0/-2`` (rich: ``max_epochs - 1``). Rich's bar where rich is installed, as Lightning picks."""
    return RichStepProgressBar() if _RICH_AVAILABLE else TQDMStepProgressBar()


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
            if not isinstance(getattr(run, "dir", None), str):  # a rank other than 0: Lightning's stand-in, no run
                return None
            directory = Path(run.dir).parent  # .../offline-run-<date>-<id>/files -> run directory
            return str(directory / f"run-{run.id}.wandb")
    return None


__all__ = ["CHECKPOINT_TENSORS", "PROGRESS_LINES", "AtomicCheckpointIO", "DivergenceGuard", "GracefulStop", "LossTrace", "ProgressLog", "RecordTrainedResult",
           "RecordWhatRan", "RichStepProgressBar", "TQDMStepProgressBar", "checkpoint_archive_problem", "csv_metrics_file", "format_duration", "make_loggers", "nonfinite_tensors",
           "progress_interval", "step_progress_bar", "wandb_run_file"]
