"""The trainer of a run: seeds and threads, the backend's strategy, loggers, callbacks and the Lightning Trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..backend.spec import backend_spec
from ..errors import RunConfigError
from .model import runs_own_schedule
from .settings import config_dict, plain, run_name


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (LoRA initialisation, dropout): same seed, same run."""
    from lightning.pytorch import seed_everything as seed_all

    seed_all(seed, workers=True, verbose=False)


def apply_cpu_threads(cfg: DictConfig) -> int | None:
    """Limit this process's torch CPU threads to ``parallel.cpu_threads``; the count now in force (``None``: not set).

    Jobs that a sweep runs side by side would otherwise each start one thread per core and
    oversubscribe the machine.
    """
    threads = cfg.parallel.get("cpu_threads")
    if threads is None:
        return None
    if threads < 1:
        raise RunConfigError(f"parallel.cpu_threads={threads}: give a positive number of threads, or null for torch's default")
    import torch

    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def make_strategy(cfg: DictConfig) -> Any:
    """The backend's Lightning strategy for ``parallel`` (:meth:`~splitllama.backend.spec.BackendSpec.strategy`).

    ``parallel.timeout_s`` bounds every collective of the process group.
    """
    from datetime import timedelta


    timeout = {"timeout": timedelta(seconds=float(cfg.parallel.timeout_s))} if cfg.parallel.timeout_s else {}
    return backend_spec(cfg).strategy(cfg, timeout)


def make_loggers(cfg: DictConfig, record: Any, *, group: str | None) -> list[Any]:
    """The loggers ``logger``'s ``_target_`` makes (W&B offline by default, CSV), with the run's name, tags and
    resolved config; where they write and how W&B started go into the run record."""
    from hydra.utils import instantiate

    from ..training.callbacks import csv_metrics_file, wandb_run_file

    loggers, info = instantiate(cfg.logger, _partial_=True, _convert_="all")(
        save_dir=cfg.paths.output_dir, config={**config_dict(cfg), "split": record.data["split"]},
        name=run_name(cfg), group=group,
        tags=[*cfg.logger.tags, plain(cfg.task.name), plain(cfg.adapter.kind), plain(cfg.objective.kind), cfg.donors.name],
    )
    record.update("paths", {"wandb_run_file": wandb_run_file(loggers), "metrics_csv": csv_metrics_file(loggers),
                            "checkpoint_dir": cfg.paths.checkpoint_dir})
    record.update("logger", info)
    return loggers


def make_callbacks(cfg: DictConfig, signals: Any) -> list[Any]:
    """The callbacks of ``callbacks``, each built from its ``_target_``: checkpoints every
    ``trainer.checkpoint_every_n_steps`` (and ``last.ckpt``), and a clean stop on a signal or at
    ``task.stop_after_steps`` (:class:`~splitllama.training.callbacks.GracefulStop`), then the user's
    ``callbacks.extra`` in their order. A callback whose config has a ``signals`` key gets the run's ``signals``.
    (A run's own Trainer adds :class:`~splitllama.training.callbacks.DivergenceGuard` before them: :func:`make_trainer`.)"""
    from hydra.utils import instantiate

    # validate_run_settings has checked that each node names an importable _target_
    nodes = [v for k, v in cfg.callbacks.items() if k != "extra"] + list((cfg.callbacks.get("extra") or {}).values())
    built = []
    for node in nodes:
        make = instantiate(node, _partial_=True, _convert_="all")
        built.append(make(signals=signals) if "signals" in node else make())
    return built


def final_val_loss(trainer: Any, module: Any, data: Any) -> float:
    """The validation loss after training: the pass fit already made at its last step (a run whose
    ``trainer.val_check_interval`` divides ``max_steps``), else a fresh validation pass."""
    last = module.last_validation
    if last is not None and last[0] == trainer.global_step and trainer.global_step > 0:
        return last[1]
    return trainer.validate(module, data, verbose=False)[0]["val/loss"]


#: Lightning's short precision names, as its Trainer resolves them (``trainer.precision`` after construction)
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def describe_run(cfg: DictConfig, trainer: Any, module: Any) -> tuple[dict[str, Any], list[str]]:
    """What ``trainer`` runs with, for results.json's ``ran`` (:class:`~splitllama.training.callbacks.RecordWhatRan`),
    and a warning for each way it differs from what the config asked: the precision Lightning resolved (``16`` on
    a CPU trains in bf16-mixed), the devices, processes and strategy; for training, the effective batch (batch x
    accumulated batches x data-parallel replicas) and the schedule; the validation blocks the data holds."""
    requested = str(cfg.trainer.precision)
    ran: dict[str, Any] = {
        "precision": str(trainer.precision), "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        "devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
    }
    warned = []
    asked = PRECISION_ALIASES.get(requested, requested)
    if asked != ran["precision"]:
        why = "; fp16 mixed precision needs a GPU" if asked == "16-mixed" and ran["precision"] == "bf16-mixed" else ""
        warned.append(f"trainer.precision={requested}: Lightning runs {ran['precision']} here ({ran['accelerator']}{why}), and "
                      f"results.json's ran.precision records that; give trainer.precision={ran['precision']} to ask for what runs"
                      f"{', or run on a GPU for fp16' if why else ''}")
    if plain(cfg.task.name) == "train":
        try:
            replicas = int(module.data_parallel_size())
        except Exception:  # noqa: BLE001 - a module without the method, or a process group not up yet
            spec = backend_spec(cfg)
            replicas = max(1, trainer.world_size // (spec.tp * spec.pp))
        t, o = cfg.trainer, cfg.optim
        effective = cfg.data.batch_size * t.accumulate_grad_batches * replicas
        ran["batch"] = {"per_replica": cfg.data.batch_size, "accumulate_grad_batches": t.accumulate_grad_batches,
                        "data_parallel": replicas, "effective": effective, "tokens_per_step": effective * cfg.data.seq_len}
        ran["schedule"] = {"max_steps": t.max_steps, "warmup_steps": o.warmup_steps, "peak_lr": o.lr, "final_lr": o.lr * o.min_lr_ratio,
                           "validate_every_steps": t.val_check_interval, "checkpoint_every_steps": t.checkpoint_every_n_steps,
                           "nonfinite_patience": t.nonfinite_patience}
    val_blocks = getattr(getattr(trainer, "datamodule", None), "val_blocks", None)
    if val_blocks is not None:
        ran["val_blocks"] = int(val_blocks.shape[0])
        asked = cfg.data.max_val_blocks
        if asked is not None and ran["val_blocks"] < asked:
            warned.append(f"data.max_val_blocks={asked}: the validation split holds {ran['val_blocks']} blocks, so the run "
                          f"validates on {ran['val_blocks']} (results.json's ran.val_blocks); raise data.val_fraction for more")
    return ran, warned


def overfit_batches(value: float) -> int | float:
    """``trainer.overfit_batches`` as Lightning reads it: a whole number >= 1 is a count of batches (``1``: train on
    one batch again and again), below 1 a fraction of them. The config holds a float, and Lightning takes the float
    ``1.0`` as 100% of the batches: ``debug=overfit`` trained on the whole stream instead of one batch."""
    value = float(value)
    return int(value) if value >= 1 and value.is_integer() else value


def make_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> Any:
    """The Lightning Trainer of ``cfg``. ``trainer.val_check_interval`` counts optimizer steps (Lightning counts
    batches: with ``accumulate_grad_batches`` > 1 it is scaled, so validation comes every that many steps).

    A run's own Trainer (of the config run.py executes, :meth:`~splitllama.results.RunRecord.of`) stops on a
    non-finite loss (:class:`~splitllama.training.callbacks.DivergenceGuard`, first, so no checkpoint of that step
    is written; ``trainer.nonfinite_patience``), records what it runs with (:func:`describe_run`) and logs a
    progress line every ``trainer.progress_every_n_steps`` steps (:class:`~splitllama.training.callbacks.ProgressLog`:
    run.log and stdout, with or without a terminal). Its progress bar counts steps. Other Trainers
    of a run (the donors trained alike, each on a copy of the config) keep a non-finite loss as their result."""
    import lightning.pytorch as pl

    from ..results import RunRecord
    from ..training.callbacks import (
        AtomicCheckpointIO,
        DivergenceGuard,
        HangWatchdog,
        ProgressLog,
        RecordWhatRan,
        step_progress_bar,
    )

    t = cfg.trainer
    interval = t.val_check_interval * t.accumulate_grad_batches if t.val_check_interval else None
    record = RunRecord.of(cfg)
    if record is not None:
        callbacks = [DivergenceGuard(t.nonfinite_patience), *callbacks,
                     RecordWhatRan(record, lambda trainer, module: describe_run(cfg, trainer, module)),
                     ProgressLog(t.get("progress_every_n_steps"))]
    if t.enable_progress_bar:  # counted in steps ("step 120/600"), not Lightning's "Epoch 0/-2"
        callbacks = [*callbacks, step_progress_bar()]
    return pl.Trainer(
        accelerator=cfg.parallel.accelerator,
        devices=cfg.parallel.devices,
        num_nodes=cfg.parallel.num_nodes,
        strategy=make_strategy(cfg),
        max_steps=t.max_steps,
        max_epochs=-1,
        # iteration-based validation: every `interval` training batches (val_check_interval steps), across epochs
        val_check_interval=interval if interval else 1.0,
        check_val_every_n_epoch=None if interval else 1,
        precision=t.precision,
        gradient_clip_val=None if runs_own_schedule(cfg) else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=overfit_batches(t.overfit_batches),
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers if loggers else False,
        callbacks=[*callbacks, *([HangWatchdog(t.hang_timeout_s)] if t.hang_timeout_s else [])],
        default_root_dir=cfg.paths.output_dir,
        use_distributed_sampler=False,  # our sampler shards by rank itself (and resumes exactly)
        enable_model_summary=False,
        # FSDP2 keeps gathered weights between a forward and its backward: gathered under
        # inference_mode (validation) they could not enter autograd afterwards
        inference_mode=cfg.parallel.strategy != "fsdp",
        # FSDP2 writes its sharded checkpoints through torch.distributed.checkpoint, not a CheckpointIO
        plugins=[AtomicCheckpointIO()] if cfg.parallel.strategy != "fsdp" else None,
    )


def sweep_group(cfg: DictConfig) -> str | None:
    """The logger group of this run: ``logger.group``, or one per multirun (``sweep-<date>-<time>``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.group:
        return cfg.logger.group
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(hydra_cfg.sweep.dir)
        return f"sweep-{sweep.parent.name}-{sweep.name}"
    return None


def finish_wandb(loggers: list[Any]) -> None:
    """End the W&B run of ``loggers``, if there is one (its exit code says whether the task raised)."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


__all__ = ["PRECISION_ALIASES", "apply_cpu_threads", "describe_run", "final_val_loss", "finish_wandb", "make_callbacks", "make_loggers", "make_strategy", "make_trainer", "seed_everything", "sweep_group"]
