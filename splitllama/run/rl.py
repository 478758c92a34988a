"""RL post-training of a split model (``task=grpo``): TRL's GRPOTrainer on held-out function headers.

The prompts are the ``def`` lines of held-out standard-library files (:mod:`splitllama.training.grpo`),
the rewards verifiable (the header parses, its parameters match), the KL term against the starting
model; what the rewards did before and after goes into the run record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..backend.spec import backend_spec
from .settings import cache_dir
from .setup import RunSetup

logger = logging.getLogger("splitllama.run")


def post_train(cfg: DictConfig, record: Any, run: RunSetup, loggers: list[Any]) -> None:
    """Build the policy (``task.model_dir`` or a fresh assembly), train it with GRPO, record the rewards, export."""
    import torch

    from ..embedded import load_stdlib_corpus
    from ..training.callbacks import progress_interval
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
    every = progress_interval(cfg.trainer.get("progress_every_n_steps"), cfg.trainer.max_steps)
    logger.info("%s", plan_line(cfg, len(train_prompts), len(eval_prompts), every))
    with record.timed("grpo"):
        history = train_grpo(
            backend.model, run.tokenizer, train_prompts, eval_prompts, grpo=grpo_cfg, optim=cfg.optim,
            max_steps=cfg.trainer.max_steps, gradient_clip_val=cfg.trainer.gradient_clip_val, seed=cfg.seed,
            output_dir=str(Path(cfg.paths.output_dir) / "grpo"), loggers=loggers,
            use_cpu=cfg.parallel.accelerator == "cpu" or not torch.cuda.is_available(), progress_every=every,
        )
    record_rewards(record, history)
    if cfg.task.export:
        with record.timed("export"):
            record.update("paths", {"export_dir": str(backend.export_hf(cfg.paths.export_dir, run.tokenizer))})


#: seconds per sampled completion on 2 CPU cores, measured with the default task=grpo (the fresh default split,
#: finetune=last, 16 tokens): in a training step (sampling, the reference's and the policy's forward, the backward)
#: and in an evaluation (sampling, forwards); the estimate a run gives before it starts
TRAIN_S_PER_COMPLETION, EVAL_S_PER_COMPLETION = 0.3, 0.35


def plan_line(cfg: DictConfig, prompts: int, eval_prompts: int, every: int) -> str:
    """What a GRPO run is about to do, said before it starts: steps, samples per step, evaluations, what trains, and
    an estimate of its time on 2 CPU cores (:data:`TRAIN_S_PER_COMPLETION`; the progress lines measure it as it goes)."""
    from ..training.callbacks import format_duration

    g, steps = cfg.task.grpo, cfg.trainer.max_steps
    evaluations = (1 + steps // g.eval_every + bool(steps % g.eval_every)) if eval_prompts and g.eval_every else 0
    evals = (f"; {evaluations} evaluations on {eval_prompts} other held-out headers (before, every {g.eval_every} steps, "
             "at the end)" if evaluations else "; no evaluation (task.grpo.eval_every=0)")
    progress = f"; a progress line every {every} steps and after the first" if every else ""
    estimate = (steps * g.prompts_per_step * TRAIN_S_PER_COMPLETION + evaluations * eval_prompts * EVAL_S_PER_COMPLETION) * g.num_generations
    return (f"grpo: {steps} steps (trainer.max_steps), each {g.prompts_per_step} of {prompts} held-out function headers x "
            f"{g.num_generations} completions of up to {g.max_completion_length} tokens{evals}; training "
            f"finetune.trainable={list(cfg.finetune.trainable)}{progress}. Estimate: about {format_duration(estimate)} on 2 CPU "
            "cores")


def record_rewards(record: Any, history: list[dict[str, Any]]) -> None:
    """GRPO's history, and the rewards and KL of its first and last steps and evaluations: the summed reward, and
    each reward's share (``eval_header_parses_*``: the share of held-out headers that parse, the parse rate)."""
    train_rows = [row for row in history if "reward" in row]
    eval_rows = [row for row in history if "eval_reward" in row]
    record.update("grpo", {"history": history})

    def evaluated(key: str, index: int) -> float | None:
        if not eval_rows or (index == -1 and len(eval_rows) < 2):
            return None
        return eval_rows[index].get(key)

    record.update("metrics", {
        "steps": max((row["step"] for row in history), default=0),
        "train_reward_first": train_rows[0]["reward"] if train_rows else None,
        "train_reward_last": train_rows[-1]["reward"] if train_rows else None,
        "eval_reward_before": evaluated("eval_reward", 0),
        "eval_reward_after": evaluated("eval_reward", -1),
        "eval_header_parses_before": evaluated("eval_rewards/header_parses/mean", 0),
        "eval_header_parses_after": evaluated("eval_rewards/header_parses/mean", -1),
        "eval_parameter_match_before": evaluated("eval_rewards/parameter_match/mean", 0),
        "eval_parameter_match_after": evaluated("eval_rewards/parameter_match/mean", -1),
        "kl_last": train_rows[-1].get("kl") if train_rows else None,
    })


__all__ = ["EVAL_S_PER_COMPLETION", "TRAIN_S_PER_COMPLETION", "plan_line", "post_train", "record_rewards"]
