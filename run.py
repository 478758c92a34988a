#!/usr/bin/env python
"""splitllama experiments: ``python run.py [group=option ...] [key=value ...]``.

    python run.py                                  # embedded tiny donors: build (cached), train the adapter, evaluate
    python run.py adapter=mlp layers.n70=8         # any config group or field, as Hydra overrides
    python run.py donors=llama3_8b_70b donors.path8b=/ckpt/8B donors.path70b=/ckpt/70B layers.n8=16
    python run.py task=assemble                    # build and save the split model, no training
    python run.py task=eval task.model_dir=outputs/.../hf_model
    python run.py task=grpo                        # RL post-training with TRL's GRPOTrainer (reward: held-out def headers)
    python run.py -m adapter=linear,mlp layers.n70=2,4,8   # a sweep (multirun)

Each run writes ``results.json`` in its run directory (``outputs/<date>/<time>-<random>/``, or
``outputs/slurm-<job id>-<command hash>/`` in a SLURM job), also when it fails or is interrupted (Ctrl-C, SIGTERM:
training stops with a checkpoint; a requeued SLURM job resumes from it). A used run directory is
refused unless the run resumes it (``ckpt_path=last``), and only by the task that made it; each attempt's
composed config is kept (``.hydra/``, then ``.hydra/attempt-<n>/``). The return value (validation loss) is
what a Hydra sweeper optimises.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from splitllama.results import RunSignals, is_first_rank, register_run_dir_resolver, resumes_run
from splitllama.training.schema import RunConfigError, register_configs

log = logging.getLogger("splitllama.run")
register_configs()
register_run_dir_resolver()
#: SIGINT / SIGTERM of this process (installed by main on rank 0; training stops cleanly on them)
SIGNALS = RunSignals()


def train(cfg: DictConfig, record) -> float:
    """Build (or reuse) donors, assemble, train what the config says, evaluate, export."""
    from splitllama.training import pipeline as P

    from splitllama.training.callbacks import RecordTrainedResult

    run = P.check(cfg, record)
    ckpt_path = P.resolve_ckpt_path(cfg) or _requeued_checkpoint(cfg)
    if ckpt_path is not None:  # the settings first, before donors or data are loaded
        P.check_resume(cfg, ckpt_path, P.trained_result(cfg, run.split), record)
    P.seed_everything(cfg.seed)
    run = P.load(cfg, record, run, stage="fit")
    trained = P.trained_result(cfg, run.split, run.donors, run.data)
    if ckpt_path is not None:  # and the donors' and the data's content
        P.check_resume(cfg, ckpt_path, trained, record)
    donors, data, references, tokenizer = run.donors, run.data, run.references, run.tokenizer
    record.update("donors", {"path8b": donors.path8b, "path70b": donors.path70b, "built_now": donors.built_now,
                             "embedded_metrics": (donors.manifest or {}).get("metrics")})
    module = P.make_module(cfg, run.spec(cfg), teacher_path=donors.path70b)
    loggers = P.make_loggers(cfg, record, group=_sweep_group(cfg))
    trainer = P.make_trainer(cfg, loggers, [*P.make_callbacks(cfg, SIGNALS), RecordTrainedResult(trained, P.CHECKPOINT_RESULT_KEY)])

    def record_model() -> None:
        record.update("params", module.parameter_counts())
        record.update("flops", module.flops())
        record.update("trainable", {"parts": list(cfg.finetune.trainable), "tensors": len(module.trainable_names)})

    # a model-parallel backend builds each rank's shard after the trainer has started its processes
    # (inside validate/fit); the others are built here, so bad donors fail before any process starts
    build_first = not P.builds_per_rank(cfg)
    try:
        if build_first:
            with record.timed("assemble"):
                module.configure_model()
            record_model()
        if cfg.task.eval_before and ckpt_path is None:
            with record.timed("eval_before"):
                record.update("metrics", {"val_loss_before": trainer.validate(module, data, verbose=False)[0]["val/loss"]})
        with record.timed("fit"):
            trainer.fit(module, data, ckpt_path=ckpt_path)
        if not build_first:
            record_model()
        with record.timed("eval_after"):
            val_loss = P.final_val_loss(trainer, module, data)
        steps = trainer.global_step
        record.update("metrics", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "steps": steps,
                                  "train_tokens_seen": data.batches_consumed * data.batch_size * data.seq_len * module.data_parallel_size()})
        if references is not None:
            record.update("metrics", references.metrics(val_loss, record.data["metrics"].get("val_loss_before")))
        final = {k: v for k, v in record.data["metrics"].items()
                 if k in ("val_loss", "val_loss_before", "gap_closed", "gap_closed_before") and v is not None}
        for lg in loggers:
            lg.log_metrics({**{f"final/{k}": v for k, v in final.items()},
                            **(references.log_values() if references is not None else {})}, step=steps)
        record.update("paths", {"checkpoint": str(Path(cfg.paths.checkpoint_dir) / "last.ckpt")})
        record.data["interrupted"] = steps < cfg.trainer.max_steps and not cfg.trainer.fast_dev_run
        # a model-parallel backend gathers its shards: every rank takes part, rank 0 writes
        if cfg.task.export and not record.data["interrupted"] and (trainer.is_global_zero or module.backend.collective_export):
            with record.timed("export"):
                export = P.export_model(module.backend, cfg.paths.export_dir, tokenizer, writer=trainer.is_global_zero)
                record.update("paths", {"export_dir": str(export)})
        if run.harness is not None and not record.data["interrupted"] and trainer.is_global_zero:
            # a sharded model (model parallel, FSDP2) is scored through its gathered export (see splitllama.harness)
            export_dir = record.data["paths"].get("export_dir")
            model = export_dir if module.backend.collective_export else module.backend.hf_model()
            P.run_harness(cfg, run.harness, record, model, tokenizer, loggers=loggers, step=steps, model_dir=export_dir,
                          donor_paths=P.harness_donor_paths(module.backend.config, donors))
    finally:
        _finish_wandb(loggers)
    return val_loss


def assemble(cfg: DictConfig, record) -> float | None:
    """Build the split model from the donors and save it (with the tokenizer), without training."""
    from splitllama.training import pipeline as P
    from splitllama.training.backend_spec import backend_spec
    from splitllama.training.module import count_flops_per_token

    run = P.load(cfg, record, P.check(cfg, record, harness=False), stage=None, references=False)
    with record.timed("assemble"):
        backend = backend_spec(cfg).build(run.spec(cfg), dict(cfg.backend.options))
    with record.timed("export"):
        out = P.export_model(backend, cfg.paths.export_dir, run.tokenizer)
    params = sum(p.numel() for p in backend.model.parameters())
    record.update("params", {"total": params, "trainable": 0})
    record.update("flops", count_flops_per_token(backend.config, cfg.data.seq_len))
    record.update("paths", {"export_dir": str(out)})
    log.info("saved the split model to %s (%s)", out, backend.config.describe())
    return None


def grpo(cfg: DictConfig, record) -> None:
    """RL post-training with TRL's GRPOTrainer (:mod:`splitllama.training.grpo`) of ``task.model_dir``
    or a fresh assembly: held-out function headers, verifiable rewards, KL to the starting model; export."""
    import torch

    from splitllama.embedded import load_stdlib_corpus
    from splitllama.training import pipeline as P
    from splitllama.training.backend_spec import backend_spec
    from splitllama.training.grpo import held_out_header_prompts, train_grpo

    run = P.check(cfg, record, harness=False)
    P.seed_everything(cfg.seed)
    model_dir = os.path.expanduser(cfg.task.model_dir) if cfg.task.model_dir else None
    run = P.load(cfg, record, run, stage=None, references=False, model_dir=model_dir)
    grpo_cfg = cfg.task.grpo
    documents = load_stdlib_corpus(P.cache_dir(cfg), cfg.data.min_doc_chars, corpus="stdlib_source", progress=False)
    train_prompts, eval_prompts = held_out_header_prompts(documents, cfg.data.val_fraction, grpo_cfg.prompts,
                                                          grpo_cfg.eval_prompts if grpo_cfg.eval_every else 0, cfg.seed)
    with record.timed("assemble"):
        backend = backend_spec(cfg).build(run.spec(cfg), dict(cfg.backend.options))
    lora = dict(cfg.finetune.lora) if cfg.finetune.lora.enabled else None
    trainable = backend.select_trainable(list(cfg.finetune.trainable), lora)
    record.update("params", backend.parameter_counts())
    record.update("trainable", {"parts": list(cfg.finetune.trainable), "tensors": len(trainable)})
    if grpo_cfg.beta > 0 and model_dir is None and lora is None:
        # TRL loads the KL reference from the policy's config._name_or_path: the starting model, saved
        with record.timed("export_start"):
            start = backend.export_hf(Path(cfg.paths.output_dir) / "start_model", run.tokenizer)
        backend.model.config._name_or_path = str(start)
        record.update("paths", {"start_model": str(start)})
    loggers = P.make_loggers(cfg, record, group=_sweep_group(cfg))
    try:
        with record.timed("grpo"):
            history = train_grpo(
                backend.model, run.tokenizer, train_prompts, eval_prompts, grpo=grpo_cfg, optim=cfg.optim,
                max_steps=cfg.trainer.max_steps, gradient_clip_val=cfg.trainer.gradient_clip_val, seed=cfg.seed,
                output_dir=str(Path(cfg.paths.output_dir) / "grpo"), loggers=loggers,
                use_cpu=cfg.parallel.accelerator == "cpu" or not torch.cuda.is_available(),
            )
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
        if cfg.task.export:
            with record.timed("export"):
                record.update("paths", {"export_dir": str(backend.export_hf(cfg.paths.export_dir, run.tokenizer))})
    finally:
        for lg in loggers:
            lg.save()
        _finish_wandb(loggers)


def evaluate(cfg: DictConfig, record) -> float:
    """Validation loss and perplexity of a saved split model (task.model_dir) or of a fresh assembly,
    and its ``eval.harness`` task scores."""
    from splitllama.training import pipeline as P
    from splitllama.training.backend_spec import BackendSpec

    run = P.check(cfg, record)
    model_dir = os.path.expanduser(cfg.task.model_dir) if cfg.task.model_dir else None
    run = P.load(cfg, record, run, stage="validate", model_dir=model_dir)
    data, references = run.data, run.references
    module = P.make_module(cfg, run.spec(cfg), teacher_path=None, objective_kind="lm")
    trainer = P.make_trainer(cfg, [], [])
    with record.timed("eval"):
        val_loss = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    record.update("params", module.parameter_counts())
    record.update("flops", module.flops())
    record.update("metrics", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                              "val_tokens": data.val_blocks.shape[0] * (data.seq_len - 1)})
    if references is not None:
        record.update("metrics", {"gap_closed": references.gap_closed(val_loss)})
    record.update("paths", {"model_dir": model_dir})
    if run.harness is not None:
        # a model-parallel model: score the saved model, or the same assembly in one process
        model = (model_dir or BackendSpec().build(module.spec, {}).model) if module.backend.collective_export else module.backend.hf_model()
        P.run_harness(cfg, run.harness, record, model, run.tokenizer, donor_paths=P.harness_donor_paths(run.split, run.donors),
                      model_dir=model_dir)
    return val_loss


def generate(cfg: DictConfig, record) -> None:
    """Complete ``task.prompts`` with vLLM (``task.engine=vllm``) or transformers (``hf``)."""
    from splitllama.training import pipeline as P

    model_dir = os.path.expanduser(cfg.task.model_dir) if cfg.task.model_dir else None
    if model_dir is None:
        assemble(cfg, record)  # validates the config first
        model_dir = cfg.paths.export_dir
    else:
        P.validate(cfg)
    prompts, n, temp = list(cfg.task.prompts), cfg.task.max_new_tokens, cfg.task.temperature
    with record.timed("generate"):
        if cfg.task.engine == "vllm":
            from splitllama.vllm import generate as vllm_generate

            texts = [g.text for g in vllm_generate(model_dir, prompts, max_new_tokens=n, temperature=temp, seed=cfg.seed)]
        elif cfg.task.engine == "hf":
            texts = _hf_generate(model_dir, prompts, n, temp, cfg.seed)
        else:
            raise RunConfigError(f"task.engine={cfg.task.engine}: must be vllm or hf")
    record.update("generations", {p: t for p, t in zip(prompts, texts)})
    for p, t in zip(prompts, texts):
        log.info("%r -> %r", p, t)


def _hf_generate(model_dir: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splitllama  # noqa: F401  (registers the split model with the Auto classes)

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


TASKS = {"train": train, "assemble": assemble, "eval": evaluate, "generate": generate, "grpo": grpo}


def sweep_value(cfg: DictConfig, val_loss: float | None, flops: dict) -> float | list[float] | None:
    """What a Hydra sweeper sees (``sweep.objective``): the validation loss, the loss penalised
    for exceeding ``sweep.flops_budget`` training FLOPs per token, or [loss, GFLOPs per token]."""
    from splitllama.training.schema import SweepObjective

    objective = cfg.sweep.objective
    if val_loss is None or objective == SweepObjective.val_loss:
        return val_loss
    train_flops = flops.get("train_flops_per_token", float("nan"))
    if objective == SweepObjective.penalised:
        return val_loss + cfg.sweep.penalty * max(0.0, train_flops / cfg.sweep.flops_budget - 1.0)
    return [val_loss, train_flops / 1e9]


def _sweep_group(cfg: DictConfig) -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.group:
        return cfg.logger.group
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(hydra_cfg.sweep.dir)
        return f"sweep-{sweep.parent.name}-{sweep.name}"
    return None


def _finish_wandb(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _config_subdir() -> str:
    """Where Hydra wrote this attempt's composed config (``.hydra``, or ``.hydra/attempt-<n>`` on a resume)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().output_subdir)


def _resumes(cfg: DictConfig) -> bool:
    return resumes_run(cfg.ckpt_path)


def _requeued_checkpoint(cfg: DictConfig) -> str | None:
    """The run directory's ``last.ckpt`` when a requeued SLURM job reruns an interrupted run."""
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    if cfg.ckpt_path is None and _resumes(cfg) and last.is_file():
        log.info("SLURM requeue (SLURM_RESTART_COUNT=%s): resuming from %s", os.environ["SLURM_RESTART_COUNT"], last)
        return str(last)
    return None


def _last_checkpoint(cfg: DictConfig) -> str | None:
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    return str(last) if last.is_file() else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from splitllama.configuration_split_llama import SplitConfigError
    from splitllama.results import RunDirInUse, RunInterrupted, RunRecord, outcome_line
    from splitllama.training.pipeline import apply_cpu_threads, config_dict, plain

    task = plain(cfg.task.name)
    rank_zero = is_first_rank()
    record = RunRecord(cfg.paths.output_dir, task=task, config=config_dict(cfg), repo_dir=Path(__file__).resolve().parent)
    if rank_zero:  # other ranks run in the directory rank 0 claimed
        try:
            record.claim(resume=_resumes(cfg), hint=", or resume it with ckpt_path=last" if task == "train" else "")
        except RunDirInUse as exc:
            raise SystemExit(f"error: {exc}") from None
        SIGNALS.install()
    try:
        record.update("paths", {"hydra_config": str(Path(cfg.paths.output_dir) / _config_subdir())})
        threads = apply_cpu_threads(cfg)
        if threads is not None:
            record.data["cpu_threads"] = threads
        metric = TASKS[task](cfg, record)
        status = "interrupted" if record.data.get("interrupted") else "ok"
        if rank_zero:
            path = record.write(status)
            log.info("%s: %s", status, path)
            summary = outcome_line(record.data)
            if summary:
                log.info("%s", summary)
        return sweep_value(cfg, metric, record.data.get("flops", {}))
    except BaseException as exc:
        if SIGNALS.received is not None or isinstance(exc, (KeyboardInterrupt, RunInterrupted)):
            # Ctrl-C (Lightning turns it into SystemExit), SIGTERM (SLURM before a kill), a clean stop on either
            checkpoint = SIGNALS.checkpoint or _last_checkpoint(cfg)
            record.data["interrupted_by"] = SIGNALS.received or type(exc).__name__
            record.update("paths", {"checkpoint": checkpoint})
            if SIGNALS.step is not None:
                record.update("metrics", {"steps": SIGNALS.step})
            if rank_zero:
                path = record.write("interrupted")
                log.error("interrupted by %s; %s records it; resume with ckpt_path=last hydra.run.dir=%s (checkpoint %s)",
                          record.data["interrupted_by"], path, cfg.paths.output_dir, checkpoint)
            raise SystemExit(143 if SIGNALS.received == "SIGTERM" else 130) from None
        record.fail(exc)
        if rank_zero:
            try:
                record.write()
            except OSError as write_error:  # a full disk: the temporary file is gone, the error is in the log
                log.error("could not write results.json (%s) to record: %s: %s", write_error, type(exc).__name__, exc)
        if not isinstance(exc, Exception):
            raise
        if _is_multirun():  # record the failure and let the sweep go on
            log.error("run failed (%s: %s); results.json records it", type(exc).__name__, exc)
            # +inf, not nan: a failed job is the worst trial (Optuna's sweeper aborts the study on nan)
            return sweep_value(cfg, math.inf, {"train_flops_per_token": math.inf})
        if isinstance(exc, (RunConfigError, SplitConfigError)):
            raise SystemExit(f"error: {exc}") from None
        raise


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable(all_threads=True)  # a crash or SIGABRT (a test's time-out) prints every thread's stack
    main()
