"""Training a split model and reading what it became: fit, the final validation loss against the
references, the export, the downstream tasks; every number into the run record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .downstream import harness_donor_paths, run_harness
from .export import export_model
from .model import builds_per_rank
from .setup import RunSetup
from .trainer import final_val_loss

#: the metrics every logger gets at the end of a run, under ``final/``
FINAL_METRICS = ("val_loss", "val_loss_before", "gap_closed", "gap_closed_before", "gap_closed_tuned")


def record_donors(record: Any, run: RunSetup) -> None:
    """Which donors the run used, whether they were built now, and the embedded ones' build metrics."""
    donors = run.donors
    record.update("donors", {"path8b": donors.path8b, "path70b": donors.path70b, "built_now": donors.built_now,
                             "embedded_metrics": (donors.manifest or {}).get("metrics")})


def record_model(record: Any, module: Any, cfg: DictConfig) -> None:
    """The built model's parameter counts, FLOPs per token and what trains."""
    record.update("params", module.parameter_counts())
    record.update("flops", module.flops())
    record.update("trainable", {"parts": list(cfg.finetune.trainable), "tensors": len(module.trainable_names)})


def fit_and_evaluate(cfg: DictConfig, record: Any, run: RunSetup, module: Any, trainer: Any, loggers: list[Any],
                     ckpt_path: str | None) -> float:
    """Fit ``module`` (from ``ckpt_path`` when resuming), then score, export and run the downstream tasks.

    A model-parallel backend builds each rank's shard after the trainer has started its processes
    (inside validate/fit); the others are built first, so bad donors fail before any process starts.
    """
    data, references = run.data, run.references
    build_first = not builds_per_rank(cfg)
    if build_first:
        with record.timed("assemble"):
            module.configure_model()
        record_model(record, module, cfg)
    if cfg.task.eval_before and ckpt_path is None:
        with record.timed("eval_before"):
            record.update("metrics", {"val_loss_before": trainer.validate(module, data, verbose=False)[0]["val/loss"]})
    with record.timed("fit"):
        trainer.fit(module, data, ckpt_path=ckpt_path)
    if not build_first:
        record_model(record, module, cfg)
    with record.timed("eval_after"):
        val_loss = final_val_loss(trainer, module, data)
    steps = trainer.global_step
    record.update("metrics", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "steps": steps,
                              "train_tokens_seen": data.batches_consumed * data.batch_size * data.seq_len * module.data_parallel_size()})
    if references is not None:
        record.update("metrics", references.metrics(val_loss, record.data["metrics"].get("val_loss_before")))
    if run.tuned is not None:
        record.update("metrics", run.tuned.metrics(val_loss))
    final = {k: v for k, v in record.data["metrics"].items() if k in FINAL_METRICS and v is not None}
    for lg in loggers:
        lg.log_metrics({**{f"final/{k}": v for k, v in final.items()},
                        **(references.log_values() if references is not None else {}),
                        **(run.tuned.log_values() if run.tuned is not None else {})}, step=steps)
    record.update("paths", {"checkpoint": str(Path(cfg.paths.checkpoint_dir) / "last.ckpt")})
    record.data["interrupted"] = steps < cfg.trainer.max_steps and not cfg.trainer.fast_dev_run
    # a model-parallel backend gathers its shards: every rank takes part, rank 0 writes
    if cfg.task.export and not record.data["interrupted"] and (trainer.is_global_zero or module.backend.collective_export):
        with record.timed("export"):
            export = export_model(module.backend, cfg.paths.export_dir, run.tokenizer, writer=trainer.is_global_zero)
            record.update("paths", {"export_dir": str(export)})
    if run.harness is not None and not record.data["interrupted"] and trainer.is_global_zero:
        # a sharded model (model parallel, FSDP2) is scored through its gathered export (see splitllama.harness)
        export_dir = record.data["paths"].get("export_dir")
        model = export_dir if module.backend.collective_export else module.backend.hf_model()
        run_harness(cfg, run.harness, record, model, run.tokenizer, loggers=loggers, step=steps, model_dir=export_dir,
                    donor_paths=harness_donor_paths(module.backend.config, run.donors))
    return val_loss


__all__ = ["FINAL_METRICS", "fit_and_evaluate", "record_donors", "record_model"]
