"""Resuming a run: which checkpoint, and whether it is the same run (every setting that decides the result).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..configuration_split_llama import SplitLlamaConfig
from ..errors import RunConfigError
from ..results import resumes_run
from .donors import Donors
from .settings import config_dict

logger = logging.getLogger(__name__)


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint saved by ``parallel=fsdp``: a directory of per-rank shards with Lightning's ``meta.pt``."""
    return path.is_dir() and (path / "meta.pt").is_file()


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: ``last`` (this run dir's checkpoints/last.ckpt), a run directory, or a .ckpt file."""
    value = cfg.ckpt_path
    if value is None:
        return None
    if value == "last":
        path = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
        hint = (
            "ckpt_path=last resumes the run in the current run directory: pass hydra.run.dir=<the interrupted run's "
            "directory>, or ckpt_path=<that directory or a .ckpt file>"
        )
    else:
        path = Path(os.path.expanduser(value))
        if path.is_dir() and not is_sharded_checkpoint(path):
            path = path / "checkpoints" / "last.ckpt"
        hint = "give a .ckpt file or a run directory that has checkpoints/last.ckpt"
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise RunConfigError(no_checkpoint_message(value, path, hint))
    from ..training.callbacks import checkpoint_archive_problem

    # a torch checkpoint is a zip archive: truncated, it lacks the directory at its end; changed bytes fail a
    # member's CRC (a sharded one, parallel=fsdp, is a directory whose meta.pt is such an archive). Checked here,
    # before donors, data or references are loaded.
    archive = path / "meta.pt" if is_sharded_checkpoint(path) else path
    problem = checkpoint_archive_problem(archive)
    if problem:
        raise RunConfigError(f"ckpt_path={value}: {path} is {problem}; resume from another .ckpt in {path.parent} or start a new run")
    return str(path)


def no_checkpoint_message(value: str, path: Path, hint: str) -> str:
    """Why ``ckpt_path=value`` finds nothing at ``path``, and what to do. A run directory whose run stopped before
    its first checkpoint has nothing to resume: the message says so, and how to start over, in itself."""
    from ..results import RESULTS_FILE, read_results

    run_dir = path.parent.parent if path.name == "last.ckpt" and path.parent.name == "checkpoints" else None
    recorded: dict[str, Any] = {}
    if run_dir is not None and (run_dir / RESULTS_FILE).is_file():
        try:
            recorded = read_results(run_dir)
        except (OSError, ValueError):
            recorded = {}
    if recorded.get("task") == "train" and recorded.get("status") != "ok":
        every = ((recorded.get("config") or {}).get("trainer") or {}).get("checkpoint_every_n_steps")
        steps = (recorded.get("metrics") or {}).get("steps")
        when = f" (at step {steps}; checkpoints are written every {every} steps, trainer.checkpoint_every_n_steps)" if every else ""
        return (f"ckpt_path={value}: the run in {run_dir} stopped (status {recorded.get('status')!r}) before its first "
                f"checkpoint{when}, so there is nothing to resume. Start it again as a new run: the same command without "
                f"ckpt_path and without hydra.run.dir (a new run directory), or delete {run_dir} and rerun the same "
                "command without ckpt_path")
    return f"ckpt_path={value}: no checkpoint at {path}; {hint}"


def finished_run_message(cfg: DictConfig, record: Any, step: int) -> str | None:
    """A resume of a run that already finished: the run directory's results.json says ``ok`` for task=train and the
    checkpoint (its settings checked by :func:`check_resume`) is at ``trainer.max_steps``. The message says so, with
    the run's outcome line; ``None`` when there is training left (a run resumed with ``task.extend=true`` and more
    ``trainer.max_steps`` goes on to them)."""
    from ..results import outcome_line

    previous = record.previous
    if not previous or previous.get("status") != "ok" or previous.get("task") != "train" or step < cfg.trainer.max_steps:
        return None
    outcome = outcome_line(previous)
    return (f"already complete: the run in {cfg.paths.output_dir} finished all {cfg.trainer.max_steps} steps with these settings "
            f"(results.json: status 'ok', finished {previous.get('finished')}); nothing was trained again and results.json is "
            "unchanged. To train longer: ckpt_path=last task.extend=true trainer.max_steps=<more>; for another run, leave "
            f"hydra.run.dir to its default" + (f". Its outcome: {outcome}" if outcome else ""))


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues: ``ckpt_path`` (:func:`resolve_ckpt_path`), or the run directory's
    ``last.ckpt`` when a requeued SLURM job reruns an interrupted run."""
    given = resolve_ckpt_path(cfg)
    if given is not None:
        return given
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    if resumes_run(cfg.ckpt_path) and last.is_file():
        logger.info("SLURM requeue (SLURM_RESTART_COUNT=%s): resuming from %s", os.environ["SLURM_RESTART_COUNT"], last)
        return str(last)
    return None


def last_checkpoint(cfg: DictConfig) -> str | None:
    """The run directory's ``last.ckpt``, if training wrote one."""
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    return str(last) if last.is_file() else None


#: the config keys whose values decide what training produces; with the resolved layers and the fingerprints of
#: the donors, the documents and the tokenizer (:func:`trained_result`) they are saved in every checkpoint, and a
#: resume (``ckpt_path``) must keep each (:func:`check_resume`). Where the files lie (donor and data paths) is not
#: among them: their content is. Besides the model, objective, data, optimiser and schedule: the classes the
#: groups name (``_target_``: one's own optimiser or data module is another run), the callbacks of one's own
#: (``callbacks.extra``: stochastic weight averaging, a batch-size schedule), the batches Lightning repeats
#: (``trainer.overfit_batches``), the data-parallel size that multiplies the batch (``parallel.devices``,
#: ``parallel.num_nodes``), FSDP's parameter dtype, and the validation blocks the result is scored on
#: (``data.max_val_blocks``: a resume keeps the first attempt's ``val_loss_before``). Every other config key is
#: classified, with its reason, in ``tests/test_resume_fields.py``.
TRAINED_RESULT_KEYS = (
    "adapter.kind", "adapter.init", "adapter.hidden_size", "adapter.rank", "adapter.bias", "adapter.checkpoint",
    "adapter.calibration_blocks", "finetune.trainable", "finetune.lora", "objective._target_", "objective.kind",
    "objective.lm_weight", "objective.distill_weight", "objective.temperature", "data._target_", "data.source",
    "data.text_field", "data.min_doc_chars", "data.seq_len", "data.batch_size", "data.val_fraction", "data.max_val_blocks",
    "seed", "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.precision",
    "trainer.overfit_batches", "optim._target_", "optim.lr", "optim.weight_decay", "optim.betas", "optim.eps",
    "optim.warmup_steps", "optim.min_lr_ratio", "backend._target_", "backend.name", "backend.dtype", "parallel.devices",
    "parallel.num_nodes", "parallel.fsdp_param_dtype", "callbacks.extra",
)


#: what a resume with ``task.extend=true`` may change (only upwards)
EXTENDABLE_KEYS = ("trainer.max_steps",)


#: the key of a checkpoint that holds :func:`trained_result` (written by :class:`~splitllama.training.callbacks.RecordTrainedResult`)
CHECKPOINT_RESULT_KEY = "splitllama_trained_result"


def trained_result(cfg: DictConfig, split: SplitLlamaConfig, donors: Donors | None = None, data: Any = None) -> dict[str, Any]:
    """What decides a training run's result, as ``{key: value}``: :data:`TRAINED_RESULT_KEYS`, the resolved
    layer lists (``layers.list8``, ``layers.list70``), and once known the donors' weights fingerprints
    (``donors.small``, ``donors.large``; :func:`~splitllama.checkpoint.weights_fingerprint`) and the data's
    (``data.documents``, ``data.tokenizer``)."""
    values = config_dict(cfg)
    result: dict[str, Any] = {}
    for key in TRAINED_RESULT_KEYS:
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        result[key] = node
    result.update({"layers.list8": list(split.layers_8), "layers.list70": list(split.layers_70)})
    if donors is not None:
        from ..checkpoint import weights_fingerprint

        result.update({"donors.small": weights_fingerprint(donors.path8b)[:16], "donors.large": weights_fingerprint(donors.path70b)[:16]})
    if data is not None:
        from ..data import documents_fingerprint, tokenizer_fingerprint

        result.update({"data.documents": documents_fingerprint(data.documents)[:16],
                       "data.tokenizer": (tokenizer_fingerprint(data.tokenizer) or "")[:16] or None})
    return result


def saved_trained_result(ckpt_path: str) -> tuple[dict[str, Any] | None, int]:
    """The :func:`trained_result` a training checkpoint was saved with (``None``: a checkpoint of an older
    version, which did not record it) and its step; only its small entries are read (memory-mapped)."""
    import pickle

    import torch

    path = Path(ckpt_path)
    archive = path / "meta.pt" if is_sharded_checkpoint(path) else path
    try:
        checkpoint = torch.load(archive, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # an object the weights-only reader refuses: read it as Lightning's resume will
        checkpoint = torch.load(archive, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get(CHECKPOINT_RESULT_KEY), int(checkpoint.get("global_step", 0))


def check_resume(cfg: DictConfig, ckpt_path: str, current: dict[str, Any], record: Any) -> int:
    """Refuse a resume that would not continue the checkpoint's run: every :func:`trained_result` entry of
    ``current`` must equal the checkpoint's, the error naming each that differs (``old -> new``). With
    ``task.extend=true`` ``trainer.max_steps`` may grow: training goes on to the new count, and
    results.json's ``resume`` says so and what the learning-rate schedule does at the resume step.
    Called with the config's entries before donors and data are loaded, then with all of them. Returns the
    checkpoint's step."""
    saved, step = saved_trained_result(ckpt_path)
    where = f"ckpt_path={cfg.ckpt_path}: the checkpoint {ckpt_path} (step {step})"
    resume: dict[str, Any] = {"checkpoint": ckpt_path, "from_step": step}
    if saved is None:
        logger.warning("%s records no settings (saved by an older version): the resume cannot be checked", where)
        record.update("resume", {**resume, "checked": False})
        return step
    changed = {key: (saved[key], value) for key, value in current.items() if key in saved and saved[key] != value}
    old_steps, new_steps = changed.get("trainer.max_steps", (None, None))
    extends = cfg.task.extend and set(changed) <= set(EXTENDABLE_KEYS) and old_steps is not None and new_steps > old_steps
    if changed and not extends:
        lines = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        hint = ""
        if old_steps is not None and new_steps > old_steps and not cfg.task.extend:
            hint = f"; to train past trainer.max_steps={old_steps}, resume with task.extend=true (nothing else changed)"
        elif old_steps is not None and new_steps < old_steps:
            hint = f"; a run is not shortened on resume (trainer.max_steps={old_steps}: task.extend only lengthens it)"
        raise RunConfigError(f"{where} was trained with other settings, and a resume continues the same run: {lines}. "
                             f"Start a new run for new settings (no ckpt_path, a new run directory){hint}")
    resume["checked"] = True
    if extends:
        from ..training.module import warmup_cosine

        o = cfg.optim
        old_lr, new_lr = (o.lr * warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio) for total in (old_steps, new_steps))
        resume["extended"] = {"trainer.max_steps": [old_steps, new_steps]}
        resume["schedule"] = (f"warmup then cosine recomputed over the new {new_steps} steps: at step {step} the learning rate is "
                              f"{new_lr:.4g} (the checkpoint's schedule over {old_steps} steps gave {old_lr:.4g}), decaying to "
                              f"{o.lr * o.min_lr_ratio:.4g} at step {new_steps}")
        logger.warning("task.extend: trainer.max_steps %d -> %d; %s", old_steps, new_steps, resume["schedule"])
    record.update("resume", resume)
    return step


__all__ = ["CHECKPOINT_RESULT_KEY", "EXTENDABLE_KEYS", "TRAINED_RESULT_KEYS", "check_resume", "checkpoint_to_resume", "finished_run_message", "is_sharded_checkpoint", "last_checkpoint", "no_checkpoint_message", "resolve_ckpt_path", "saved_trained_result", "trained_result"]
