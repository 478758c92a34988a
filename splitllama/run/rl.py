"""RL post-training of a split model (``task=grpo``): TRL's GRPOTrainer on held-out function headers.

The prompts are the ``def`` lines of held-out standard-library files (:mod:`splitllama.training.grpo`),
the rewards verifiable (the header parses, its parameters match), the KL term against the starting
model; what the rewards did before and after goes into the run record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..backend.spec import backend_spec
from .settings import cache_dir
from .setup import RunSetup


def post_train(cfg: DictConfig, record: Any, run: RunSetup, loggers: list[Any]) -> None:
    """Build the policy (``task.model_dir`` or a fresh assembly), train it with GRPO, record the rewards, export."""
    import torch

    from ..embedded import load_stdlib_corpus
    from ..training.grpo import held_out_header_prompts, train_grpo

    grpo_cfg = cfg.task.grpo
    documents = load_stdlib_corpus(cache_dir(cfg), cfg.data.min_doc_chars, corpus="stdlib_source", progress=False)
    train_prompts, eval_prompts = held_out_header_prompts(documents, cfg.data.val_fraction, grpo_cfg.prompts,
                                                          grpo_cfg.eval_prompts if grpo_cfg.eval_every else 0, cfg.seed)
    with record.timed("assemble"):
        backend = backend_spec(cfg).build(run.spec(cfg), dict(cfg.backend.options))
    lora = dict(cfg.finetune.lora) if cfg.finetune.lora.enabled else None
    trainable = backend.select_trainable(list(cfg.finetune.trainable), lora)
    record.update("params", backend.parameter_counts())
    record.update("trainable", {"parts": list(cfg.finetune.trainable), "tensors": len(trainable)})
    if grpo_cfg.beta > 0 and run.model_dir is None and lora is None:
        # TRL loads the KL reference from the policy's config._name_or_path: the starting model, saved
        with record.timed("export_start"):
            start = backend.export_hf(Path(cfg.paths.output_dir) / "start_model", run.tokenizer)
        backend.model.config._name_or_path = str(start)
        record.update("paths", {"start_model": str(start)})
    with record.timed("grpo"):
        history = train_grpo(
            backend.model, run.tokenizer, train_prompts, eval_prompts, grpo=grpo_cfg, optim=cfg.optim,
            max_steps=cfg.trainer.max_steps, gradient_clip_val=cfg.trainer.gradient_clip_val, seed=cfg.seed,
            output_dir=str(Path(cfg.paths.output_dir) / "grpo"), loggers=loggers,
            use_cpu=cfg.parallel.accelerator == "cpu" or not torch.cuda.is_available(),
        )
    record_rewards(record, history)
    if cfg.task.export:
        with record.timed("export"):
            record.update("paths", {"export_dir": str(backend.export_hf(cfg.paths.export_dir, run.tokenizer))})


def record_rewards(record: Any, history: list[dict[str, Any]]) -> None:
    """GRPO's history, and the rewards and KL of its first and last steps and evaluations."""
    train_rows = [row for row in history if "reward" in row]
    eval_rows = [row for row in history if "eval_reward" in row]
    record.update("grpo", {"history": history})
    record.update("metrics", {
        "steps": max((row["step"] for row in history), default=0),
        "train_reward_first": train_rows[0]["reward"] if train_rows else None,
        "train_reward_last": train_rows[-1]["reward"] if train_rows else None,
        "eval_reward_before": eval_rows[0]["eval_reward"] if eval_rows else None,
        "eval_reward_after": eval_rows[-1]["eval_reward"] if len(eval_rows) > 1 else None,
        "kl_last": train_rows[-1].get("kl") if train_rows else None,
    })


__all__ = ["post_train", "record_rewards"]
