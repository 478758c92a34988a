"""Typed schema of ``run.py``'s configuration (Hydra structured configs).

The dataclasses below are stored in Hydra's ConfigStore as ``run_schema`` and sit first in
``conf/config.yaml``'s defaults list, so every config group option and every command-line
override is merged into a typed node: a misspelt key, a wrong type or an unknown enum value
fails at composition with the full key named (``layers.n8=abc``, ``adapter.kind=mlpp``).

Checks that need more than a type (ranges, donor layer counts) run in
:func:`splitllama.run.settings.validate_run_settings` and :func:`splitllama.run.checks.validate`
before anything heavy: the split-model fields go through :class:`splitllama.SplitLlamaConfig`
(the one home of that validation) and its errors are reported under the override's name, e.g.
``layers.n70=99: must be an integer in 0..8 ...``.

Bad overrides fail before any weights, data or training, but not before the imports: importing
this module imports the ``splitllama`` package, which registers the split model with transformers
(and so imports transformers and torch); ``run.py`` with a bad override takes the seconds of those
imports (about 13 s of the 19 s to a composition error, measured on a loaded 2-core machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf reads typing generics

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING



class TaskName(Enum):
    train = "train"
    assemble = "assemble"
    eval = "eval"
    generate = "generate"
    grpo = "grpo"


class AdapterKind(Enum):
    linear = "linear"
    mlp = "mlp"
    identity = "identity"
    lowrank = "lowrank"


class AdapterInit(Enum):
    random = "random"
    identity = "identity"
    lstsq = "lstsq"


class ObjectiveKind(Enum):
    lm = "lm"
    distill = "distill"
    mixed = "mixed"


class LoggerKind(Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class WandbMode(Enum):
    offline = "offline"
    online = "online"


class HarnessEngine(Enum):
    hf = "hf"
    vllm = "vllm"


class DataSource(Enum):
    """Where a run's text comes from: a standard-library corpus (:data:`splitllama.embedded.CORPORA`) or files."""

    stdlib_source = "stdlib_source"
    stdlib_docs = "stdlib_docs"
    files = "files"


#: the embedded corpus each stdlib data source reads (``EmbeddedRecipe.corpus``)
DATA_CORPUS = {DataSource.stdlib_source: "stdlib_source", DataSource.stdlib_docs: "stdlib_docstrings"}
#: the donor corpora whose training split leaves out each data source's validation documents: ``python_source``
#: starts with the stdlib source files and splits them by the same hash of their text
DATA_HELD_OUT_OF = {DataSource.stdlib_source: {"stdlib_source", "python_source"}, DataSource.stdlib_docs: {"stdlib_docstrings"}}


#: What ``finetune.trainable`` may list.
TRAINABLE_PARTS = ("adapter", "first", "last", "embeddings", "norm", "head", "all")


@dataclass
class GrpoConfig:
    """``task=grpo``: TRL's GRPOTrainer on held-out function headers (:mod:`splitllama.training.grpo`).
    Steps: ``trainer.max_steps``; optimiser: ``optim``; what trains: ``finetune``."""

    #: reward functions, summed (:data:`splitllama.training.grpo.REWARDS`)
    rewards: List[str] = field(default_factory=lambda: ["header_parses", "parameter_match"])
    #: their weights (empty: 1 each)
    reward_weights: List[float] = field(default_factory=list)
    #: held-out headers to train on, and others to evaluate on
    prompts: int = 256
    eval_prompts: int = 16
    #: completions sampled per prompt (the group whose rewards are compared)
    num_generations: int = 8
    prompts_per_step: int = 4
    max_completion_length: int = 16
    temperature: float = 1.0
    #: weight of the KL penalty to the starting model (0: no reference model, no KL logged)
    beta: float = 0.04
    #: evaluate on the eval prompts every this many steps (and before the first; 0: never)
    eval_every: int = 10


@dataclass
class TaskConfig:
    """What run.py does. ``train``: assemble, train, evaluate, export. ``assemble``: build and save
    without training. ``eval``: score a saved split model (``model_dir``) or a fresh assembly.
    ``generate``: sample from ``model_dir`` (or a fresh assembly) with vLLM or transformers.
    ``grpo``: RL post-training of ``model_dir`` (or a fresh assembly) with TRL, then export."""

    name: TaskName = TaskName.train
    #: ``trainer.max_steps`` unless it is given (``max_steps: ${task.default_max_steps}`` in conf/trainer/default.yaml):
    #: each task's own length for a first run (train 600; grpo, a few minutes on a CPU)
    default_max_steps: int = 600
    eval_before: bool = True
    export: bool = True
    model_dir: Optional[str] = None
    # generate
    engine: str = "vllm"
    prompts: List[str] = field(default_factory=lambda: ["Return the number of"])
    max_new_tokens: int = 32
    temperature: float = 0.0
    # debugging: stop training after this many steps, as an interrupted run would (resume with ckpt_path)
    stop_after_steps: Optional[int] = None
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    #: a resume (ckpt_path) that raises trainer.max_steps: train on to the new count (else any change is refused)
    extend: bool = False


def _typed_view(recipe_cls: type, name: str, doc: str, defaults: dict[str, Any], nested: dict[str, Any]) -> type:
    """A Hydra structured config with ``recipe_cls``'s fields (``X | None`` as ``Optional[X]``) and ``defaults``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(recipe_cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(recipe_cls):
        if f.name in nested:
            view, factory = nested[f.name]
            fields.append((f.name, view, field(default_factory=factory)))
            continue
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        if typing.get_origin(kind) is tuple:  # a recipe's tuple is a list in a config
            fields.append((f.name, List[args[0]], field(default_factory=lambda v=defaults.get(f.name, ()): list(v))))  # type: ignore[valid-type]
            continue
        if type(None) in args:
            kind = Optional[next(a for a in args if a is not type(None))]
        fields.append((f.name, kind, field(default=defaults.get(f.name, MISSING))))
    view = dataclasses.make_dataclass(name, fields)
    view.__doc__, view.__module__ = doc, __name__
    return view


def _embedded_views() -> tuple[type, type]:
    """The embedded-donor recipe's schema, read off its one definition (:class:`splitllama.embedded.EmbeddedRecipe`):
    the same fields, typed for Hydra, with the recipe's defaults (written once, there)."""
    from dataclasses import asdict

    from ..embedded import DonorRecipe, EmbeddedRecipe

    recipe = asdict(EmbeddedRecipe())
    donor = _typed_view(DonorRecipe, "DonorShapeConfig", "One embedded donor (splitllama.embedded.DonorRecipe).", {}, {})
    embedded = _typed_view(
        EmbeddedRecipe, "EmbeddedConfig", "Recipe of the embedded donors (splitllama.embedded.EmbeddedRecipe); its hash keys the cache.",
        recipe, {which: (donor, lambda which=which: donor(**recipe[which])) for which in ("small", "large")},
    )
    return donor, embedded


DonorShapeConfig, EmbeddedConfig = _embedded_views()


@dataclass
class DonorsConfig:
    """The two donors. ``path8b``/``path70b`` null: the embedded tiny donors (built and cached).

    The paths default to MISSING, not None: OmegaConf ignores a ``???`` merged over a value, so a
    None default would turn a preset's required ``path8b: ???`` into "use the embedded donors".
    """

    name: str = "tiny"
    path8b: Optional[str] = MISSING
    path70b: Optional[str] = MISSING
    #: layer counts used when ``layers.n8`` / ``layers.n70`` are not given
    default_n8: int = 2
    default_n70: int = 4
    #: the learning rate of ``optim`` (``optim.lr: ${donors.default_lr}``) unless ``optim.lr`` is given: what
    #: suits a split depends on its donors' scale (the embedded toy donors take far more than a 70B's layers)
    default_lr: float = 1e-3
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)  # type: ignore[valid-type]
    #: where a preset's checkpoints come from (Hugging Face hub ids; named in the error for a missing path)
    hub8b: Optional[str] = None
    hub70b: Optional[str] = None
    #: config.json values a preset's checkpoints have (the keys LlamaConfig takes: ``rope_theta``,
    #: ``rope_scaling``, ...); a checkpoint that differs fails before any weights are read. None: no check
    expect8b: Optional[Dict[str, Any]] = None
    expect70b: Optional[Dict[str, Any]] = None
    #: run although the large donor's tokenizer maps text to other ids than the small donor's (recorded in results.json)
    allow_tokenizer_mismatch: bool = False


@dataclass
class LayersConfig:
    """Donor layers: ``n8`` first layers of the small donor, ``n70`` last of the large one, or
    explicit increasing index lists ``list8`` / ``list70``."""

    n8: Optional[int] = None
    n70: Optional[int] = None
    list8: Optional[List[int]] = None
    list70: Optional[List[int]] = None


@dataclass
class AdapterConfig:
    kind: AdapterKind = AdapterKind.linear
    #: null: ``lstsq`` where it applies (linear and lowrank adapters on the hf backend), else ``random``
    #: (``identity`` needs none; see :func:`splitllama.run.model.adapter_init`); ``lstsq`` fits on
    #: ``calibration_blocks`` training blocks
    init: Optional[AdapterInit] = None
    hidden_size: Optional[int] = None
    rank: Optional[int] = None
    bias: bool = True
    checkpoint: Optional[str] = None
    calibration_blocks: int = 64


@dataclass
class BackendConfig:
    """Which implementation runs the split model: ``_target_`` names its class (see
    :mod:`splitllama.backend.spec`), which gets the other fields; ``options`` go to its model."""

    _target_: str = "splitllama.backend.spec.BackendSpec"
    name: str = "hf"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    #: model parallelism, backend=megatron's settings (``conf/backend/megatron.yaml``; the megatron files of
    #: ``parallel`` set them with their device count): tensor / pipeline parallel sizes and sequence
    #: parallelism (data parallel size = processes / (tp x pp)); every other backend runs tp = pp = 1
    tp: int = 1
    pp: int = 1
    sp: bool = False
    #: backend=megatron: each batch (data.batch_size) is split into micro-batches of this size for
    #: megatron's schedule (None: one micro-batch); pipelines want >= pp micro-batches
    micro_batch_size: Optional[int] = None
    options: Any = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """Processes and devices: Lightning's accelerator, devices per node, nodes and strategy. Model-parallel
    sizes are the backend's (``backend.tp``, ``backend.pp``, ...; the megatron files here set them too)."""

    name: str = "single"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    #: FSDP only (FSDP2, splitllama.backend.sharding): FULL_SHARD (free gathered weights after
    #: each layer's forward) or SHARD_GRAD_OP (keep them for the backward); each decoder layer its
    #: own unit; fsdp_param_dtype=bfloat16 gathers and computes in bf16 with float32 master
    #: weights and float32 gradient reduction (null: the parameters' dtype)
    fsdp_sharding_strategy: str = "FULL_SHARD"
    fsdp_wrap_decoder_layers: bool = True
    fsdp_param_dtype: Optional[str] = None
    #: process-group timeout in seconds (a collective that waits longer fails with an error
    #: instead of hanging; null: torch's default of 30 min)
    timeout_s: Optional[float] = None
    #: torch CPU threads of each run process (None: torch's default, one per core). Jobs that a
    #: sweep runs side by side (hydra/launcher=joblib) each want cores / n_jobs.
    cpu_threads: Optional[int] = None


@dataclass
class DataConfig:
    """The corpus and its batches; instantiates ``_target_`` (the run adds the tokenizer, cache, steps and seed)."""

    _target_: str = "splitllama.run.data.text_datamodule"
    name: str = "stdlib_docs"
    source: DataSource = DataSource.stdlib_docs
    files: List[str] = field(default_factory=list)
    text_field: str = "text"
    min_doc_chars: int = 80
    seq_len: int = 256
    batch_size: int = 8
    val_batch_size: Optional[int] = None
    val_fraction: float = 0.05
    max_val_blocks: Optional[int] = None
    num_workers: int = 0


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments (the ones a run needs; see conf/trainer/)."""

    max_steps: int = 80
    val_check_interval: Optional[int] = 40
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 1
    #: a progress line (step/max_steps, loss, tokens/s, time left) in run.log and on stdout every this many
    #: steps and at the last (splitllama.training.callbacks.ProgressLog); null: about 10 over the run; 0: none
    progress_every_n_steps: Optional[int] = None
    checkpoint_every_n_steps: int = 40
    fast_dev_run: Any = False
    overfit_batches: float = 0.0
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    deterministic: bool = False
    #: seconds without a training or validation batch after which every rank dumps its threads'
    #: stacks and exits (splitllama.training.callbacks.HangWatchdog); null: off
    hang_timeout_s: Optional[float] = None
    #: optimizer steps in a row with a non-finite training loss before the run stops as ``diverged``
    #: (splitllama.training.callbacks.DivergenceGuard); 0: at the first
    nonfinite_patience: int = 0


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr`` (instantiates ``_target_``)."""

    _target_: str = "splitllama.training.module.OptimSettings"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1


@dataclass
class ObjectiveConfig:
    """``lm``: next-token loss. ``distill``: KL to the full large donor's logits. ``mixed``:
    ``lm_weight * lm + distill_weight * distill`` (instantiates ``_target_``)."""

    _target_: str = "splitllama.training.objectives.Objective"
    kind: ObjectiveKind = ObjectiveKind.lm
    lm_weight: float = 1.0
    distill_weight: float = 1.0
    temperature: float = 1.0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    #: which donor layers get LoRA: ``first`` (small donor), ``last`` (large donor)
    parts: List[str] = field(default_factory=lambda: ["first", "last"])


@dataclass
class FinetuneConfig:
    """What trains: any of adapter, first, last, embeddings, norm, head, all; plus LoRA."""

    trainable: List[str] = field(default_factory=lambda: ["adapter"])
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LoggerConfig:
    """What :func:`splitllama.training.callbacks.make_loggers` (``_target_``) gets from the config."""

    _target_: str = "splitllama.training.callbacks.make_loggers"
    kind: LoggerKind = LoggerKind.wandb
    mode: WandbMode = WandbMode.offline
    project: str = "splitllama"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    #: also write metrics.csv next to W&B
    csv: bool = True
    init_timeout: float = 60.0


@dataclass
class ModelCheckpointConfig:
    """Lightning's ModelCheckpoint: every ``trainer.checkpoint_every_n_steps`` steps into ``paths.checkpoint_dir``, and ``last.ckpt``."""

    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str = II("paths.checkpoint_dir")
    every_n_train_steps: int = II("trainer.checkpoint_every_n_steps")
    save_last: bool = True
    #: 0: ``last.ckpt`` alone. Without a ``monitor`` Lightning's top-k 1 is the latest checkpoint, a copy of ``last.ckpt``
    #: written beside it (twice the writes and the disk); set a monitor and k to keep the best ones too
    save_top_k: int = 0
    #: false: a resumed run overwrites last.ckpt (with Lightning's counter it wrote last-v1.ckpt beside the
    #: interrupted attempt's, and the next ckpt_path=last resumed from that stale one)
    enable_version_counter: bool = False


@dataclass
class GracefulStopConfig:
    """A clean stop with ``last.ckpt`` at ``task.stop_after_steps`` or on a signal (:class:`splitllama.training.callbacks.GracefulStop`)."""

    _target_: str = "splitllama.training.callbacks.GracefulStop"
    checkpoint_path: str = "${paths.checkpoint_dir}/last.ckpt"
    steps: Optional[int] = II("task.stop_after_steps")
    #: the run's SIGINT/SIGTERM watcher (run.py gives its own; null: stop at ``steps`` only)
    signals: Any = None


@dataclass
class CallbacksConfig:
    """The Lightning callbacks of training, each built from its ``_target_`` (:func:`splitllama.run.trainer.make_callbacks`).
    Their settings stay where they were: ``trainer.checkpoint_every_n_steps``, ``task.stop_after_steps``."""

    model_checkpoint: ModelCheckpointConfig = field(default_factory=ModelCheckpointConfig)
    graceful_stop: GracefulStopConfig = field(default_factory=GracefulStopConfig)
    #: more callbacks by name, each a node with its ``_target_``, e.g.
    #: ``+callbacks.extra.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor``
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = "~/.cache/splitllama"
    export_dir: str = "hf_model"
    checkpoint_dir: str = "checkpoints"


@dataclass
class HarnessConfig:
    """Downstream tasks scored with lm-evaluation-harness at the end of ``task=train`` and in
    ``task=eval`` (see :mod:`splitllama.harness`). ``tasks`` empty: off."""

    tasks: List[str] = field(default_factory=list)
    #: items per task: a count, a fraction (< 1), or null for all
    limit: Optional[float] = None
    #: null: each task's default
    num_fewshot: Optional[int] = None
    batch_size: int = 32
    #: a folder of lm-eval task YAML files of one's own
    include_path: Optional[str] = None
    #: hf: the model in memory (HFLM); vllm: lm-eval's vLLM model over the saved model
    engine: HarnessEngine = HarnessEngine.hf
    #: also score both donors (once per donor weights and task settings, cached)
    references: bool = True
    bootstrap_iters: int = 1000
    #: also write each item's per-choice log-likelihoods to <run dir>/harness_samples/<task>.jsonl
    log_samples: bool = False


@dataclass
class EvalConfig:
    """What a run measures besides its own validation loss.

    ``references``: score both donors (plain LLaMA models) on the run's validation blocks, so
    results.json, the loggers and the sweep summary carry ``small_val_loss``, ``large_val_loss``
    and ``gap_closed`` (0 at the small donor, 1 at the large). Scores are cached per donor and
    blocks (see :mod:`splitllama.references`); ``false`` skips them.
    ``tuned_references``: also train each donor on the run's own training data with the run's budget
    (steps, batch, sequence length, schedule, seed), all its parameters, at the best learning rate of
    ``tuned_lr_grid`` (chosen on the validation blocks), and report ``gap_closed_tuned`` against those:
    what splitting buys beyond what training on the data buys. ``null``: on for the embedded donors, off
    for real checkpoints (it trains both donors whole, ``len(tuned_lr_grid)`` times each; cached per donor,
    data, budget and grid, so a sweep trains each once; see :mod:`splitllama.run.references`).
    ``harness``: downstream tasks (lm-evaluation-harness), with the donors scored the same way.
    """

    references: bool = True
    tuned_references: Optional[bool] = None
    #: peak learning rates tried for each donor (at least 3 values over at least 10x)
    tuned_lr_grid: List[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    harness: HarnessConfig = field(default_factory=HarnessConfig)


class SweepObjective(Enum):
    """What ``run.py`` returns to a Hydra sweeper (Optuna minimises it)."""

    val_loss = 1
    #: ``val_loss + penalty * max(0, flops / flops_budget - 1)``: a compute budget as a soft constraint
    penalised = 2
    #: ``[val_loss, training GFLOPs per token]``: two objectives, Optuna reports the Pareto front
    val_loss_and_flops = 3


@dataclass
class SweepConfig:
    """The value a sweep optimises (see conf/experiment/optuna_layers.yaml)."""

    objective: SweepObjective = SweepObjective.val_loss
    #: training FLOPs per token allowed before the penalty applies (``penalised``)
    flops_budget: Optional[float] = None
    penalty: float = 1.0


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    donors: DonorsConfig = field(default_factory=DonorsConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    #: resume: ``last`` (this run dir's checkpoints/last.ckpt), a .ckpt file, or another run's directory
    ckpt_path: Optional[str] = None


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists ``run_schema`` first)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


__all__ = [
    "DATA_CORPUS",
    "DATA_HELD_OUT_OF",
    "TRAINABLE_PARTS",
    "AdapterConfig",
    "AdapterInit",
    "AdapterKind",
    "DataSource",
    "EvalConfig",
    "GrpoConfig",
    "HarnessEngine",
    "ObjectiveKind",
    "RunConfig",
    "SweepConfig",
    "SweepObjective",
    "TaskName",
    "register_configs",
]
