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
    ``callbacks.extra`` in their order. A callback whose config has a ``signals`` key gets the run's ``signals``."""
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


def make_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> Any:
    import lightning.pytorch as pl

    from ..training.callbacks import AtomicCheckpointIO, HangWatchdog

    t = cfg.trainer
    interval = t.val_check_interval
    return pl.Trainer(
        accelerator=cfg.parallel.accelerator,
        devices=cfg.parallel.devices,
        num_nodes=cfg.parallel.num_nodes,
        strategy=make_strategy(cfg),
        max_steps=t.max_steps,
        max_epochs=-1,
        # iteration-based validation: every `interval` training batches, across epochs
        val_check_interval=interval if interval else 1.0,
        check_val_every_n_epoch=None if interval else 1,
        precision=t.precision,
        gradient_clip_val=None if runs_own_schedule(cfg) else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
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


__all__ = ["apply_cpu_threads", "final_val_loss", "finish_wandb", "make_callbacks", "make_loggers", "make_strategy", "make_trainer", "seed_everything", "sweep_group"]
