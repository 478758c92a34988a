"""Downstream tasks of a run (``eval.harness``): prepared before anything heavy, scored after training, donors beside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..configuration_split_llama import SplitLlamaConfig
from ..errors import RunConfigError
from .donors import Donors
from .model import builds_per_rank
from .schema import DATA_CORPUS
from .settings import cache_dir, plain

logger = logging.getLogger(__name__)


def prepare_harness(cfg: DictConfig) -> Any:
    """``eval.harness``'s tasks resolved and their datasets loaded (None when the list is empty).

    Called right after :func:`validate`: an unknown task or a missing dataset fails here, naming
    the task, before donors are built or a model is assembled.
    """
    from ..harness import HarnessSettings, prepare_tasks

    settings = HarnessSettings.from_config(cfg.eval.harness)
    if not settings.enabled:
        return None
    task = plain(cfg.task.name)
    if settings.engine == "vllm" and ((task == "train" and not cfg.task.export) or (task == "eval" and not cfg.task.model_dir)):
        raise RunConfigError("eval.harness.engine=vllm: vLLM scores a saved model; give task.model_dir (task=eval) or keep "
                             "task.export=true (task=train), or use eval.harness.engine=hf (the model in memory)")
    if (builds_per_rank(cfg) or cfg.parallel.strategy == "fsdp") and task == "train" and not cfg.task.export:
        raise RunConfigError(f"eval.harness.tasks: a sharded model (backend={cfg.backend.name}, parallel={cfg.parallel.name}) is "
                             "scored through its exported HF model (see splitllama.harness); keep task.export=true, or set "
                             "eval.harness.tasks=[]")
    # our tasks' test items: held out of what the models learned (the run's stdlib data, else the embedded donors' corpus)
    corpus = DATA_CORPUS.get(cfg.data.source, cfg.donors.embedded.corpus)
    return prepare_tasks(settings, cache_dir(cfg), corpus)


def run_harness(cfg: DictConfig, prepared: Any, record: Any, model: Any, tokenizer: Any, *, donor_paths: dict[str, str] | None,
                model_dir: str | None = None, loggers: Sequence[Any] = (), step: int = 0) -> dict[str, Any]:
    """Score ``model`` (in memory, or a saved directory) on the prepared tasks, and the donors
    (``donor_paths``: ``{"small": ..., "large": ...}``; cached) when ``eval.harness.references``.

    Writes ``metrics.harness``, ``references.harness`` and ``metrics.harness_signal`` (per task: the split's and the
    donors' scores with their standard errors, ``separates_donors`` and a ``gap_closed`` only where the task separates
    them, else ``why_no_gap``; :func:`~splitllama.harness.donor_separation`) into the run record (per-item
    log-likelihoods into ``harness_samples/`` with ``eval.harness.log_samples``) and logs
    ``harness/<task>/<metric>`` (donors: ``harness_small/...``, ``harness_large/...``).
    """
    from ..harness import (donor_references, logger_metrics, references_for_record, score_model, separation_text, separations,
                           write_samples)

    with record.timed("harness"):
        result = score_model(model, tokenizer, prepared, model_dir=model_dir)
    record.update("metrics", {"harness": result.scores})
    if result.samples is not None:
        record.update("paths", {"harness_samples": str(write_samples(result.samples, Path(cfg.paths.output_dir) / "harness_samples"))})
    logged = logger_metrics(result.scores)
    signal: dict[str, dict[str, Any]] = {}
    if prepared.settings.references and donor_paths:
        with record.timed("harness_references"):
            references = donor_references(donor_paths, tokenizer, prepared, cache_dir(cfg))
        record.update("references", {"harness": references_for_record(references)})
        for which, ref in references.items():
            logged.update(logger_metrics(ref["scores"], prefix=f"harness_{which}"))
        # does each task tell the donors apart beyond their standard errors? a gap closed only where it does
        signal = separations(result.scores, {which: ref["scores"] for which, ref in references.items()})
        record.update("metrics", {"harness_signal": signal})
    for lg in loggers:
        lg.log_metrics(logged, step=step)
        lg.save()  # after fit nothing else flushes the CSV logger's buffer
    for task, row in result.scores.items():
        if task in signal:
            logger.info("%s", separation_text(task, signal[task]))
        else:
            logger.info("harness %s: %s", task, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if v is not None))
    return result.scores


def harness_donor_paths(split: SplitLlamaConfig, donors: Donors | None) -> dict[str, str] | None:
    """The donors to score as references: the run's, or those a saved split model names (if present)."""
    if donors is not None:
        return {"small": donors.path8b, "large": donors.path70b}
    paths = {"small": split.path8b, "large": split.path70b}
    if all(p and Path(p).is_dir() for p in paths.values()):
        return paths
    logger.warning("eval.harness.references: the saved model's donors (%s) are not on this machine; no references", paths)
    return None


__all__ = ["harness_donor_paths", "prepare_harness", "run_harness"]
