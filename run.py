#!/usr/bin/env python
"""splitllama experiments: ``python run.py [group=option ...] [key=value ...]``.

    python run.py                                  # embedded tiny donors: build (cached), train the adapter, evaluate
    python run.py adapter=mlp layers.n70=8         # any config group or field, as Hydra overrides
    python run.py donors=llama3_8b_70b donors.path8b=/ckpt/8B donors.path70b=/ckpt/70B layers.n8=16
    python run.py task=assemble                    # build and save the split model, no training
    python run.py task=eval task.model_dir=outputs/.../hf_model
    python run.py task=grpo                        # RL post-training with TRL's GRPOTrainer (reward: held-out def headers)
    python run.py -m adapter=linear,mlp layers.n70=2,4,8   # a sweep (multirun)

Each task below is a table of contents: its steps, each from its module of :mod:`splitllama.run`. Every
run writes ``results.json`` in its run directory, however it ends (:mod:`splitllama.run.outcome`); the
return value (validation loss) is what a Hydra sweeper optimises.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig

from splitllama.results import RunAlreadyComplete, RunRecord, RunSignals, register_run_dir_resolver
from splitllama.run.schema import register_configs
from splitllama.run.settings import saved_model_dir

log = logging.getLogger("splitllama.run")
register_configs()
register_run_dir_resolver()
SIGNALS = RunSignals()  # SIGINT / SIGTERM (installed on rank 0): training stops cleanly on them


def train(cfg: DictConfig, record: RunRecord) -> float:
    """Build (or reuse) donors, assemble, train what the config says, evaluate, export."""
    from splitllama.run import fit, model, references, resume, setup, trainer
    from splitllama.training.callbacks import RecordTrainedResult

    run = setup.check(cfg, record)
    record.update("split", {"adapter_init": model.adapter_init_used(cfg)})
    ckpt_path = resume.checkpoint_to_resume(cfg)
    if ckpt_path is not None:  # the settings first, before donors or data are loaded
        step = resume.check_resume(cfg, ckpt_path, resume.trained_result(cfg, run.split), record)
        finished = resume.finished_run_message(cfg, record, step)
        if finished:  # a resume of a finished run: nothing to train, results.json stays as it is
            raise RunAlreadyComplete(finished, previous=record.previous)
    trainer.seed_everything(cfg.seed)
    run = setup.load(cfg, record, run, stage="fit")
    trained = resume.trained_result(cfg, run.split, run.donors, run.data)
    if ckpt_path is not None:  # and the donors' and the data's content
        resume.check_resume(cfg, ckpt_path, trained, record)
    run.tuned = references.references_trained_alike(cfg, record, run.donors, run.data)  # the donors trained alike
    fit.record_donors(record, run)
    module = model.make_module(cfg, run.spec(cfg), teacher_path=run.donors.path70b)
    loggers = trainer.make_loggers(cfg, record, group=trainer.sweep_group(cfg))
    callbacks = [*trainer.make_callbacks(cfg, SIGNALS), RecordTrainedResult(trained, resume.CHECKPOINT_RESULT_KEY)]
    try:
        return fit.fit_and_evaluate(cfg, record, run, module, trainer.make_trainer(cfg, loggers, callbacks), loggers, ckpt_path)
    finally:
        trainer.finish_wandb(loggers)


def assemble(cfg: DictConfig, record: RunRecord) -> None:
    """Build the split model from the donors and save it (with the tokenizer), without training."""
    from splitllama.backend.spec import backend_spec
    from splitllama.flops import count_flops_per_token
    from splitllama.run import export, model, setup

    run = setup.load(cfg, record, setup.check(cfg, record, harness=False), stage=None, references=False)
    record.update("split", {"adapter_init": model.adapter_init_used(cfg)})
    with record.timed("assemble"):
        backend = backend_spec(cfg).build(run.spec(cfg), dict(cfg.backend.options))
    with record.timed("export"):
        out = export.export_model(backend, cfg.paths.export_dir, run.tokenizer)
    record.update("params", {"total": sum(p.numel() for p in backend.model.parameters()), "trainable": 0})
    record.update("flops", count_flops_per_token(backend.config, cfg.data.seq_len))
    record.update("paths", {"export_dir": str(out)})
    log.info("saved the split model to %s (%s)", out, backend.config.describe())


def grpo(cfg: DictConfig, record: RunRecord) -> None:
    """RL post-training with TRL's GRPOTrainer (:mod:`splitllama.run.rl`) of ``task.model_dir`` or a fresh assembly."""
    from splitllama.run import model, rl, setup, trainer

    run = setup.check(cfg, record, harness=False)
    record.update("split", {"adapter_init": model.adapter_init_used(cfg, saved_model_dir(cfg))})
    trainer.seed_everything(cfg.seed)
    run = setup.load(cfg, record, run, stage=None, references=False, model_dir=saved_model_dir(cfg))
    loggers = trainer.make_loggers(cfg, record, group=trainer.sweep_group(cfg))
    try:
        rl.post_train(cfg, record, run, loggers)
    finally:
        for lg in loggers:
            lg.save()
        trainer.finish_wandb(loggers)


def evaluate(cfg: DictConfig, record: RunRecord) -> float:
    """Validation loss, perplexity and ``eval.harness`` scores of a saved split model (task.model_dir) or an assembly."""
    from splitllama.backend.spec import BackendSpec
    from splitllama.run import checks, downstream, model, setup, trainer

    run = setup.load(cfg, record, setup.check(cfg, record), stage="validate", model_dir=saved_model_dir(cfg))
    record.update("split", {"adapter_init": model.adapter_init_used(cfg, run.model_dir)})
    module = model.make_module(cfg, run.spec(cfg), teacher_path=None, objective_kind="lm")
    validator = trainer.make_trainer(cfg, [], [])
    with record.timed("eval"):
        val_loss = validator.validate(module, run.data, verbose=False)[0]["val/loss"]
    checks.check_finite_eval(val_loss, module, run.model_dir)  # NaN weights: status diverged, not ok
    record.update("params", module.parameter_counts())
    record.update("flops", module.flops())
    record.update("metrics", {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                              "val_tokens": run.data.val_blocks.shape[0] * (run.data.seq_len - 1)})
    if run.references is not None:
        record.update("metrics", {"gap_closed": run.references.gap_closed(val_loss)})
    record.update("paths", {"model_dir": run.model_dir})
    if run.harness is not None:
        # a model-parallel model: score the saved model, or the same assembly in one process
        scored = (run.model_dir or BackendSpec().build(module.spec, {}).model) if module.backend.collective_export else module.backend.hf_model()
        downstream.run_harness(cfg, run.harness, record, scored, run.tokenizer, model_dir=run.model_dir,
                               donor_paths=downstream.harness_donor_paths(run.split, run.donors))
    return val_loss


def generate(cfg: DictConfig, record: RunRecord) -> None:
    """Complete ``task.prompts`` with vLLM (``task.engine=vllm``) or transformers (``hf``)."""
    from splitllama.run import checks
    from splitllama.run.generate import generate_texts

    saved = saved_model_dir(cfg)
    if saved is None:
        assemble(cfg, record)  # validates the config first
        saved = cfg.paths.export_dir
    else:
        checks.validate(cfg)
    generate_texts(cfg, saved, record)


TASKS = {"train": train, "assemble": assemble, "eval": evaluate, "generate": generate, "grpo": grpo}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    from splitllama.run.outcome import execute

    return execute(cfg, TASKS, SIGNALS, repo_dir=Path(__file__).resolve().parent)


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable(all_threads=True)  # a crash or SIGABRT (a test's time-out) prints every thread's stack
    main()
