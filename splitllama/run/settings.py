"""The run config's own rules, and the names every step reads off it.

:func:`validate_run_settings` checks the fields that need no donor (ranges, parts, parallel sizes,
GRPO, extra callbacks, the embedded recipe) before anything heavy; :func:`explain_split_error` words a
split-config error under the override that fixes it. The helpers below it (:func:`plain`,
:func:`config_dict`, :func:`layer_selection`, :func:`cache_dir`, ...) are the one reading of the config
that the other steps share.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import RunConfigError, check_setting
from .schema import DATA_CORPUS, DATA_HELD_OUT_OF, TRAINABLE_PARTS, DataSource, SweepObjective, TaskName


#: SplitLlamaConfig field -> the run-config key a user overrides.
SPLIT_FIELD_TO_KEY = {
    "num_layers_8": "layers.n8",
    "num_layers_70": "layers.n70",
    "layers_8": "layers.list8",
    "layers_70": "layers.list70",
    "adapter": "adapter.kind",
    "mlp": "adapter.kind",
    "adapter_hidden_size": "adapter.hidden_size",
    "adapter_rank": "adapter.rank",
    "adapter_bias": "adapter.bias",
    "path8b": "donors.path8b",
    "path70b": "donors.path70b",
    "config_8b": "donors.path8b",
    "config_70b": "donors.path70b",
}
#: which donor a split field concerns, for the message
SPLIT_FIELD_DONOR = {"num_layers_8": "small", "layers_8": "small", "num_layers_70": "large", "layers_70": "large"}


def _validate_embedded_recipe(embedded: Any) -> None:
    """The pre-training fields of the embedded-donor recipe (shapes are checked by the split config)."""
    from ..embedded import CORPORA

    check_setting(embedded.corpus in CORPORA, "donors.embedded.corpus", embedded.corpus, f"must be one of {', '.join(sorted(CORPORA))}")
    if embedded.max_doc_chars is not None:
        check_setting(embedded.max_doc_chars >= embedded.min_doc_chars, "donors.embedded.max_doc_chars", embedded.max_doc_chars,
               f"must be >= min_doc_chars={embedded.min_doc_chars}, or null")
    check_setting(embedded.heldout_blocks >= 1, "donors.embedded.heldout_blocks", embedded.heldout_blocks, "must be >= 1")
    if embedded.eval_every is not None:
        check_setting(embedded.eval_every >= 1, "donors.embedded.eval_every", embedded.eval_every, "must be >= 1, or null")
    for which in ("small", "large"):
        donor = embedded[which]
        check_setting(donor.pretrain_steps >= 1, f"donors.embedded.{which}.pretrain_steps", donor.pretrain_steps, "must be >= 1")
        check_setting(donor.lr > 0, f"donors.embedded.{which}.lr", donor.lr, "must be > 0")
        if donor.warmup_steps is not None:
            check_setting(0 <= donor.warmup_steps <= donor.pretrain_steps, f"donors.embedded.{which}.warmup_steps", donor.warmup_steps,
                   f"must be in [0, pretrain_steps={donor.pretrain_steps}], or null")


def _validate_extra_callbacks(cfg: Any) -> None:
    """``callbacks.extra``: each entry a node whose ``_target_`` names an importable class (checked
    here, before donors or data are loaded, not when the Trainer is built)."""
    import importlib

    for name, node in (cfg.callbacks.get("extra") or {}).items():
        field_name = f"callbacks.extra.{name}"
        target = node.get("_target_") if hasattr(node, "get") else None
        if not isinstance(target, str) or "." not in target:
            raise RunConfigError(f"{field_name}={node!r}: a callback is a node with a _target_ naming its class, "
                                 f"e.g. +{field_name}._target_=lightning.pytorch.callbacks.LearningRateMonitor")
        module_name, _, attr = target.rpartition(".")
        try:
            found = hasattr(importlib.import_module(module_name), attr)
        except ImportError:
            found = False
        if not found:
            raise RunConfigError(f"{field_name}._target_={target}: no such class (module {module_name} has no {attr}, or does not import)")


def _check_known_keys(node: Any, path: str = "") -> None:
    """Every key of a typed node is a field of its schema. Hydra's ``+key=value`` adds a key even to a typed
    node (``+layers.n_70=1`` would be ignored by the run); such a key is an error naming the closest field.
    Free-form nodes (``callbacks.extra``, ``backend.options``, ``donors.expect8b``) take any key."""
    import dataclasses
    import difflib

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        name = f"{path}{key}"
        if key == "hydra" and not path:  # Hydra's own node, where a config is composed with it
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"did you mean {path}{close[0]}? " if close else ""
            raise RunConfigError(f"+{name}={OmegaConf.select(node, str(key))}: {path.rstrip('.') or 'the config'} has no key {key!r}; "
                                 f"{hint}its keys: {', '.join(fields)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_known_keys(child, f"{name}.")


def validate_run_settings(cfg: Any) -> None:
    """Range checks of fields that need no donor (cheap; run before anything else)."""
    _check_known_keys(cfg)
    check_cache_dir(cfg)
    check_setting(cfg.data.seq_len >= 2, "data.seq_len", cfg.data.seq_len, "must be >= 2")
    check_setting(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be >= 1")
    # 0 is not "unset" (null is): a zero would fall back to another value silently
    for key, value in (("data.val_batch_size", cfg.data.val_batch_size), ("data.max_val_blocks", cfg.data.max_val_blocks),
                       ("backend.micro_batch_size", cfg.backend.micro_batch_size)):
        check_setting(value is None or value >= 1, key, value, "must be >= 1, or null for the default")
    check_setting(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    check_setting(cfg.eval.harness.batch_size >= 1, "eval.harness.batch_size", cfg.eval.harness.batch_size, "must be >= 1")
    check_setting(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    check_setting(cfg.trainer.max_steps >= 1, "trainer.max_steps", cfg.trainer.max_steps, "must be >= 1")
    check_setting(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches, "must be >= 1")
    check_setting(cfg.trainer.checkpoint_every_n_steps >= 1, "trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps, "must be >= 1")
    check_setting(cfg.trainer.nonfinite_patience >= 0, "trainer.nonfinite_patience", cfg.trainer.nonfinite_patience,
                  "must be >= 0 (optimizer steps with a non-finite loss before the run stops as diverged; 0: at the first)")
    hang = cfg.trainer.hang_timeout_s
    check_setting(hang is None or hang >= 0, "trainer.hang_timeout_s", hang, "must be > 0 seconds, or null (or 0) for no watchdog")
    check_setting(str(cfg.trainer.precision) in PRECISIONS, "trainer.precision", cfg.trainer.precision,
                  f"must be one of {', '.join(PRECISIONS)} (trainer=bf16 sets bf16-mixed for a GPU; 32-true runs anywhere)")
    check_setting(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    check_setting(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "must be >= 0")
    check_setting(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "must be >= 0")
    check_setting(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be in [0, 1]")
    check_setting(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", list(cfg.optim.betas), "must be two numbers in [0, 1)")
    check_setting(cfg.objective.lm_weight >= 0, "objective.lm_weight", cfg.objective.lm_weight, "must be >= 0")
    check_setting(cfg.objective.distill_weight >= 0, "objective.distill_weight", cfg.objective.distill_weight, "must be >= 0")
    check_setting(cfg.objective.temperature > 0, "objective.temperature", cfg.objective.temperature, "must be > 0")
    for part in cfg.finetune.trainable:
        check_setting(part in TRAINABLE_PARTS, "finetune.trainable", list(cfg.finetune.trainable), f"{part!r} is not one of {', '.join(TRAINABLE_PARTS)}")
    lora = cfg.finetune.lora
    if lora.enabled:
        check_setting(lora.r >= 1, "finetune.lora.r", lora.r, "must be >= 1")
        check_setting(0.0 <= lora.dropout < 1.0, "finetune.lora.dropout", lora.dropout, "must be in [0, 1)")
        for part in lora.parts:
            check_setting(part in ("first", "last"), "finetune.lora.parts", list(lora.parts), f"{part!r} is not one of first, last")
    if not cfg.finetune.trainable and not lora.enabled and cfg.task.name == TaskName.train:
        raise RunConfigError(f"finetune.trainable=[]: nothing would train; list a part (e.g. finetune.trainable=[adapter]; "
                             f"one of {', '.join(TRAINABLE_PARTS)}) or enable LoRA (finetune=lora)")
    check_setting(cfg.adapter.calibration_blocks >= 1, "adapter.calibration_blocks", cfg.adapter.calibration_blocks, "must be >= 1")
    if cfg.data.source == DataSource.files:
        check_setting(len(cfg.data.files) > 0, "data.files", list(cfg.data.files), "must list at least one .txt or .jsonl file for data.source=files")
    if cfg.sweep.objective == SweepObjective.penalised:
        check_setting(cfg.sweep.flops_budget is not None and cfg.sweep.flops_budget > 0, "sweep.flops_budget", cfg.sweep.flops_budget,
               "must be > 0 (training FLOPs per token) for sweep.objective=penalised")
    if cfg.task.name == TaskName.grpo:
        _validate_grpo(cfg)
    if cfg.task.name == TaskName.generate:  # before the assembly that a generate without task.model_dir does first
        check_setting(cfg.task.engine in GENERATE_ENGINES, "task.engine", cfg.task.engine,
                      f"must be one of {', '.join(GENERATE_ENGINES)} (vllm needs the vllm extra; hf runs anywhere)")
        check_setting(cfg.task.max_new_tokens >= 1, "task.max_new_tokens", cfg.task.max_new_tokens, "must be >= 1")
        check_setting(cfg.task.temperature >= 0, "task.temperature", cfg.task.temperature, "must be >= 0 (0: greedy)")
    _validate_parallel(cfg)
    _validate_extra_callbacks(cfg)
    _validate_embedded_recipe(cfg.donors.embedded)
    embedded_donors = cfg.donors.get("path8b") is None and cfg.donors.get("path70b") is None
    if embedded_donors and cfg.data.source in DATA_CORPUS and cfg.donors.embedded.corpus not in DATA_HELD_OUT_OF[cfg.data.source]:
        # the held-out documents are held out of one corpus; the other one's overlap the donors' training text
        source = cfg.data.source.value
        fits = [k.value for k, corpora in DATA_HELD_OUT_OF.items() if cfg.donors.embedded.corpus in corpora]
        raise RunConfigError(
            f"data.source={source}: the embedded donors learned donors.embedded.corpus={cfg.donors.embedded.corpus}, so "
            f"validation on {DATA_CORPUS[cfg.data.source]} would score text they trained on; use "
            f"{' or '.join(f'data={f}' for f in fits) or 'data=files'}, or set donors.embedded.corpus={DATA_CORPUS[cfg.data.source]}"
        )
    check_setting(cfg.sweep.penalty >= 0, "sweep.penalty", cfg.sweep.penalty, "must be >= 0")
    if cfg.task.stop_after_steps is not None:
        check_setting(cfg.task.stop_after_steps >= 1, "task.stop_after_steps", cfg.task.stop_after_steps, "must be >= 1")
        if cfg.task.name == TaskName.train:
            check_setting(cfg.task.stop_after_steps < cfg.trainer.max_steps, "task.stop_after_steps", cfg.task.stop_after_steps,
                          f"must be below trainer.max_steps={cfg.trainer.max_steps}: training ends there first (and exports), so "
                          f"the stop would never happen; give a step below {cfg.trainer.max_steps}, or null for a whole run")
    if cfg.task.name in (TaskName.eval, TaskName.generate, TaskName.grpo) and cfg.task.model_dir is not None:
        from pathlib import Path

        check_setting(Path(cfg.task.model_dir).expanduser().is_dir(), "task.model_dir", cfg.task.model_dir,
                      "is not a directory; give the saved split model of a run (its <run dir>/hf_model, which task=train "
                      "and task=assemble write), or leave task.model_dir out to assemble one from the donors")
    for key in ("path8b", "path70b"):
        value = cfg.donors.get(key)
        if value is not None:
            from pathlib import Path

            check_setting(Path(value).expanduser().is_dir(), f"donors.{key}", value,
                          f"is not a directory; give donors.{key}=<dir> of a Hugging Face LLaMA checkpoint (config.json and "
                          f"*.safetensors, e.g. from `hf download <model> --local-dir <dir>`), or drop donors.path8b and "
                          f"donors.path70b for the embedded tiny donors")


#: what ``parallel.accelerator`` takes: Lightning's accelerator names, and its ``gpu`` alias
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

#: what ``task.engine`` of ``task=generate`` takes
GENERATE_ENGINES = ("vllm", "hf")

#: what ``trainer.precision`` takes: Lightning's names (its Trainer refuses anything else, once the donors are loaded)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")


def setting_warnings(cfg: Any) -> list[str]:
    """Settings a run takes but that defeat part of themselves, one line each naming the setting, what it does to
    the run and the fix (run.py logs them and keeps them in results.json's ``warnings``, before any work). The ones
    that defeat the whole of themselves are refused by :func:`validate_run_settings` instead
    (``task.stop_after_steps`` at or past ``trainer.max_steps``: the stop it asks for never comes)."""
    if cfg.task.name != TaskName.train or cfg.trainer.max_steps < 1:  # trainer.max_steps < 1 is refused, not warned about
        return []
    from ..training.module import warmup_cosine

    t, o = cfg.trainer, cfg.optim
    steps, warned = t.max_steps, []
    if o.warmup_steps >= steps:
        reached = warmup_cosine(steps - 1, o.warmup_steps, steps, o.min_lr_ratio)
        warned.append(f"optim.warmup_steps={o.warmup_steps} >= trainer.max_steps={steps}: the learning rate warms up for the whole run, "
                      f"reaching {reached:.0%} of optim.lr={o.lr:g} at the last step, and never decays; give optim.warmup_steps "
                      f"below {steps} (a tenth of the steps is usual) for the schedule to run")
    if t.val_check_interval is not None and t.val_check_interval > steps:
        warned.append(f"trainer.val_check_interval={t.val_check_interval} > trainer.max_steps={steps}: no validation during training, "
                      f"only the final one; give trainer.val_check_interval <= {steps} for a validation curve")
    if t.checkpoint_every_n_steps > steps:
        warned.append(f"trainer.checkpoint_every_n_steps={t.checkpoint_every_n_steps} > trainer.max_steps={steps}: no checkpoint "
                      f"before training ends (a crash restarts it from step 0; a signal still checkpoints); give "
                      f"trainer.checkpoint_every_n_steps <= {steps}")
    if t.log_every_n_steps > steps:
        warned.append(f"trainer.log_every_n_steps={t.log_every_n_steps} > trainer.max_steps={steps}: no training step is logged; "
                      f"give trainer.log_every_n_steps <= {steps}")
    return warned


def written_paths(cfg: Any) -> dict[str, str]:
    """The output directories a task writes that the user may point elsewhere, by the key that sets each
    (checked against other runs' directories before the task starts: :func:`splitllama.results.output_refusal`)."""
    task, out = cfg.task.name, {}
    if task == TaskName.train:
        out["paths.checkpoint_dir"] = cfg.paths.checkpoint_dir
    if (task == TaskName.train and cfg.task.export) or task == TaskName.assemble or (task == TaskName.grpo and cfg.task.export) \
            or (task == TaskName.generate and not cfg.task.model_dir):
        out["paths.export_dir"] = cfg.paths.export_dir
    return out


def _validate_grpo(cfg: Any) -> None:
    """``task.grpo`` and what GRPO takes of the rest (the HF backend, one device)."""
    from ..training.grpo import REWARDS

    grpo = cfg.task.grpo
    for name in grpo.rewards:
        check_setting(name in REWARDS, "task.grpo.rewards", list(grpo.rewards), f"{name!r} is not one of {', '.join(REWARDS)}")
    check_setting(len(grpo.rewards) > 0, "task.grpo.rewards", [], f"list at least one of {', '.join(REWARDS)}")
    check_setting(not grpo.reward_weights or len(grpo.reward_weights) == len(grpo.rewards), "task.grpo.reward_weights",
           list(grpo.reward_weights), f"must be empty or give one weight per reward ({len(grpo.rewards)})")
    check_setting(grpo.prompts >= grpo.prompts_per_step, "task.grpo.prompts", grpo.prompts,
           f"must be >= task.grpo.prompts_per_step={grpo.prompts_per_step}")
    check_setting(grpo.prompts_per_step >= 1, "task.grpo.prompts_per_step", grpo.prompts_per_step, "must be >= 1")
    check_setting(grpo.eval_prompts >= 0, "task.grpo.eval_prompts", grpo.eval_prompts, "must be >= 0")
    check_setting(grpo.num_generations >= 2, "task.grpo.num_generations", grpo.num_generations,
           "must be >= 2 (GRPO compares the rewards of a prompt's completions)")
    check_setting(grpo.max_completion_length >= 1, "task.grpo.max_completion_length", grpo.max_completion_length, "must be >= 1")
    check_setting(grpo.temperature > 0, "task.grpo.temperature", grpo.temperature, "must be > 0 (GRPO samples)")
    check_setting(grpo.beta >= 0, "task.grpo.beta", grpo.beta, "must be >= 0")
    check_setting(grpo.eval_every >= 0, "task.grpo.eval_every", grpo.eval_every, "must be >= 0 (0: no evaluation)")
    check_setting(cfg.backend.name == "hf", "backend", cfg.backend.name, "task=grpo runs the HF model (backend=hf)")
    check_setting(cfg.parallel.devices == 1 and cfg.parallel.num_nodes == 1 and cfg.parallel.strategy == "auto", "parallel",
           cfg.parallel.name, "task=grpo runs in one process on one device (parallel=single)")


def _validate_parallel(cfg: Any) -> None:
    """The device layout and the backend's parallel sizes against each other (head divisibility is checked with the donors)."""
    from ..backend.spec import backend_spec

    par, backend = cfg.parallel, backend_spec(cfg)
    check_setting(_devices_ok(par.devices), "parallel.devices", par.devices,
                  "must be a number of devices >= 1, -1 (every device), auto, or a list of device indices such as [0,1]; "
                  "parallel=single runs on one device")
    check_setting(par.num_nodes >= 1, "parallel.num_nodes", par.num_nodes, "must be >= 1 (1: this machine only)")
    check_setting(str(par.accelerator) in ACCELERATORS, "parallel.accelerator", par.accelerator,
                  f"must be one of {', '.join(ACCELERATORS)} (auto picks a GPU where there is one, else the CPU)")
    if par.strategy not in ("auto", "ddp", "fsdp", "megatron"):  # the parallel files' strategies; else Lightning's by name
        from lightning.pytorch.strategies import StrategyRegistry

        known = StrategyRegistry.available_strategies()
        check_setting(par.strategy in known, "parallel.strategy", par.strategy,
                      "must be auto, ddp or fsdp (parallel=single, ddp, fsdp set them), megatron (backend=megatron), or a "
                      f"strategy Lightning registers ({', '.join(n for n in ('ddp_spawn', 'ddp_fork', 'deepspeed') if n in known)}, ...)")
    check_setting(backend.tp >= 1, "backend.tp", backend.tp, "must be >= 1")
    check_setting(backend.pp >= 1, "backend.pp", backend.pp, "must be >= 1")
    check_setting(par.timeout_s is None or par.timeout_s > 0, "parallel.timeout_s", par.timeout_s, "must be > 0 seconds (or null)")
    if par.strategy == "fsdp":
        from ..backend.sharding import RESHARD_AFTER_FORWARD

        check_setting(backend.shards_with_fsdp, "parallel.strategy", "fsdp",
               f"shards the HF backend (backend={cfg.backend.name} shards with its own tp/pp/dp: parallel=tp2, pp2, ...)")
        check_setting(par.fsdp_sharding_strategy in RESHARD_AFTER_FORWARD, "parallel.fsdp_sharding_strategy",
               par.fsdp_sharding_strategy, f"must be one of {sorted(RESHARD_AFTER_FORWARD)}")
        check_setting(par.fsdp_param_dtype in (None, "bfloat16", "float16", "float32"), "parallel.fsdp_param_dtype",
               par.fsdp_param_dtype, "must be bfloat16, float16, float32 or null")
        check_setting(not str(cfg.trainer.precision).startswith(("bf16", "16")) or par.fsdp_param_dtype is None,
               "trainer.precision", cfg.trainer.precision,
               "with parallel.fsdp_param_dtype set, FSDP2 does the casting: keep trainer.precision=32-true")
    backend.validate(cfg)


def _devices_ok(devices: Any) -> bool:
    """``parallel.devices`` as Lightning's Trainer takes it: a count >= 1, -1 (all), ``auto``, a comma-separated
    string of indices, or a non-empty list of indices (refused here, not by the Trainer once the donors are loaded)."""
    from omegaconf import ListConfig

    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return True
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if text.isdigit():
            return int(text) >= 1
        return bool(parts) and all(p.isdigit() for p in parts)
    return False


def explain_split_error(message: str, cfg: Any) -> str:
    """Re-word a ``SplitConfigError`` (``SplitLlamaConfig.<field>: ...``) under the override's key."""
    prefix = "SplitLlamaConfig."
    if not message.startswith(prefix) or ":" not in message:
        return message
    field_name, _, rest = message[len(prefix):].partition(":")
    base = field_name.split(".")[0]
    key = SPLIT_FIELD_TO_KEY.get(base, base)
    section, _, leaf = key.partition(".")
    value = cfg[section].get(leaf) if leaf else None
    if isinstance(value, Enum):
        value = value.name
    donor = SPLIT_FIELD_DONOR.get(base)
    where = f" for the {donor} donor" if donor else ""
    return f"{key}={value}:{rest}{where} (SplitLlamaConfig.{field_name})"


def plain(value: Any) -> Any:
    """An enum member's name, anything else unchanged."""
    return value.name if isinstance(value, Enum) else value


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (for results.json and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)  # type: ignore[return-value]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(cfg.paths.cache_dir))


def check_cache_dir(cfg: DictConfig) -> None:
    """``paths.cache_dir`` (``$SPLITLLAMA_CACHE``) is a directory this user can write, or can be made: a run
    writes there (the embedded donors it builds, tokenised corpora, the donors' scores) and would otherwise fail
    at its first write, with an error that names no setting."""
    from ..files import writable_dir_problem

    problem = writable_dir_problem(cache_dir(cfg))
    if problem:
        env = os.environ.get("SPLITLLAMA_CACHE")
        source = " (from $SPLITLLAMA_CACHE)" if env and os.path.expanduser(env) == str(cache_dir(cfg)) else ""
        raise RunConfigError(f"paths.cache_dir={cfg.paths.cache_dir}{source}: {problem}; the cache must be a directory this "
                             "user can write. Set SPLITLLAMA_CACHE (or paths.cache_dir=) to one, e.g. SPLITLLAMA_CACHE=~/.cache/splitllama")


def uses_embedded_donors(cfg: DictConfig) -> bool:
    return cfg.donors.path8b is None and cfg.donors.path70b is None


def embedded_recipe(cfg: DictConfig) -> Any:
    from ..embedded import EmbeddedRecipe

    return EmbeddedRecipe.from_dict(OmegaConf.to_container(cfg.donors.embedded, resolve=True))  # type: ignore[arg-type]


def layer_selection(cfg: DictConfig) -> dict[str, Any]:
    """``num_layers_8/70`` and ``layers_8/70`` for SplitLlamaConfig (counts default to the donor preset's)."""
    layers = cfg.layers
    list8 = list(layers.list8) if layers.list8 is not None else None
    list70 = list(layers.list70) if layers.list70 is not None else None
    n8 = layers.n8 if layers.n8 is not None else (None if list8 is not None else cfg.donors.default_n8)
    n70 = layers.n70 if layers.n70 is not None else (None if list70 is not None else cfg.donors.default_n70)
    return {"num_layers_8": n8, "num_layers_70": n70, "layers_8": list8, "layers_70": list70}


def saved_model_dir(cfg: DictConfig) -> str | None:
    """``task.model_dir``, the saved split model a task starts from (``None``: assemble from the donors)."""
    return os.path.expanduser(cfg.task.model_dir) if cfg.task.model_dir else None


def run_name(cfg: DictConfig) -> str:
    sel = layer_selection(cfg)
    n8 = sel["num_layers_8"] if sel["num_layers_8"] is not None else len(sel["layers_8"])
    n70 = sel["num_layers_70"] if sel["num_layers_70"] is not None else len(sel["layers_70"])
    return cfg.logger.name or f"{plain(cfg.task.name)}-{plain(cfg.adapter.kind)}-n8_{n8}-n70_{n70}-{plain(cfg.objective.kind)}"


__all__ = ["ACCELERATORS", "GENERATE_ENGINES", "PRECISIONS", "SPLIT_FIELD_TO_KEY", "cache_dir", "check_cache_dir", "config_dict", "embedded_recipe", "explain_split_error", "layer_selection", "plain", "run_name", "saved_model_dir", "setting_warnings", "uses_embedded_donors",
           "validate_run_settings", "written_paths"]
