"""The model of a run: how the adapter starts, what the backend builds, and the LightningModule around it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..backend.spec import backend_spec
from ..configuration_split_llama import SplitLlamaConfig
from .donors import Donors
from .schema import AdapterKind
from .settings import layer_selection, plain


def adapter_init(cfg: DictConfig) -> str | None:
    """How the adapter starts: ``adapter.init`` as given; ``null`` means least squares (SN-Net's stitch,
    far better than random before any training) where the backend can fit it (hf; a linear, low-rank or MLP
    adapter: the MLP holds the same map, see :func:`splitllama.assembly`), else ``random``. ``None`` when nothing is initialised (the identity
    adapter, or a trained ``adapter.checkpoint``)."""
    if cfg.adapter.kind == AdapterKind.identity or cfg.adapter.checkpoint is not None:
        return None
    if cfg.adapter.init is not None:
        return plain(cfg.adapter.init)
    fits_lstsq = cfg.adapter.kind in (AdapterKind.linear, AdapterKind.lowrank, AdapterKind.mlp) and cfg.backend.name == "hf"
    return "lstsq" if fits_lstsq else "random"


def adapter_init_used(cfg: DictConfig, model_dir: str | None = None) -> str:
    """How the run's adapter started, resolved, as results.json records it (``split.adapter_init``): what
    :func:`adapter_init` chooses (``lstsq``, ``random``, ``identity``), ``checkpoint`` (a trained
    ``adapter.checkpoint``), ``saved`` (the model of ``task.model_dir``, built earlier) or ``none`` (the identity
    adapter has no weights). ``adapter.init: null`` in the config says only that the default was asked for."""
    if model_dir is not None:
        return "saved"
    if cfg.adapter.checkpoint is not None:
        return "checkpoint"
    return adapter_init(cfg) or "none"


def model_spec(cfg: DictConfig, donors: Donors | None, *, calibration: Any = None, model_dir: str | None = None,
               split: SplitLlamaConfig | None = None) -> Any:
    """What the backend builds; ``split`` (the config :func:`validate` returned; for the embedded donors
    completed by :func:`with_built_donors`) is carried when it describes these donors or this saved model,
    so the run builds its split config once."""
    from ..backend.interface import SplitModelSpec

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


def make_module(cfg: DictConfig, spec: Any, teacher_path: str | None, objective_kind: str | None = None) -> Any:
    """The LightningModule; ``objective_kind`` overrides ``objective.kind`` (evaluation scores ``lm``)."""
    from hydra.utils import instantiate

    from ..training.module import SplitLlamaLitModule

    options = {"gradient_checkpointing": cfg.backend.gradient_checkpointing, **OmegaConf.to_container(cfg.backend.options, resolve=True)}
    if cfg.parallel.strategy == "fsdp":  # how the HF backend shards itself (splitllama.backend.sharding)
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
    inside validate/fit); see :attr:`~splitllama.backend.spec.BackendSpec.builds_per_rank`."""
    return backend_spec(cfg).builds_per_rank


def runs_own_schedule(cfg: DictConfig) -> bool:
    """The backend trains through its own forward-backward schedule (manual optimisation).

    It then clips gradients itself (over all model-parallel shards), so the Trainer gets no
    ``gradient_clip_val``.
    """
    return backend_spec(cfg).runs_own_schedule


__all__ = ["adapter_init", "adapter_init_used", "builds_per_rank", "make_module", "model_spec", "runs_own_schedule"]
