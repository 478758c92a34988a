"""The split model a backend builds: what the LightningModule gets, and the transformers implementation.

A backend object (:class:`splitllama.training.backend_spec.BackendSpec`, chosen by
``conf/backend/<name>.yaml``'s ``_target_``) builds a :class:`SplitBackend` for a
:class:`SplitModelSpec`: the split model (assembled from donors, or loaded from a saved split
model), which selects what trains and exports a Hugging Face split checkpoint. The LightningModule
only calls the :class:`SplitBackend` methods, so another implementation (the megatron-core one in
``splitllama.megatron``) plugs in with its own ``BackendSpec`` subclass and YAML file.

Which donor tensor lands where is decided by :mod:`splitllama.weight_map` in every backend;
a backend adds only its own layout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..configuration_split_llama import SplitLlamaConfig
from ..weight_map import PART_PREFIXES

logger = logging.getLogger(__name__)


@dataclass
class SplitModelSpec:
    """What to build: a split model from two donors, or a saved split model (``model_dir``)."""

    path8b: str | None = None
    path70b: str | None = None
    num_layers_8: int | None = None
    num_layers_70: int | None = None
    layers_8: list[int] | None = None
    layers_70: list[int] | None = None
    adapter: str = "linear"
    adapter_init: str | None = None
    adapter_hidden_size: int | None = None
    adapter_rank: int | None = None
    adapter_bias: bool = True
    adapter_checkpoint: str | None = None
    #: token ids ``(batch, seq)`` for ``adapter_init="lstsq"``
    calibration: torch.Tensor | None = field(default=None, repr=False)
    model_dir: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    seed: int = 0
    #: the validated split config, when the run already holds it (see :meth:`split_config`)
    config: SplitLlamaConfig | None = field(default=None, repr=False)

    def split_config(self) -> SplitLlamaConfig:
        """The validated split config: built from the fields once (reads only the donors' config.json,
        no weights), then carried; every backend builds its model from this one object."""
        if self.config is None:
            if self.model_dir is not None:
                self.config = SplitLlamaConfig.from_pretrained(self.model_dir)
            else:
                self.config = SplitLlamaConfig(
                    path8b=self.path8b, path70b=self.path70b, num_layers_8=self.num_layers_8, num_layers_70=self.num_layers_70,
                    layers_8=self.layers_8, layers_70=self.layers_70, adapter=self.adapter,
                    adapter_hidden_size=self.adapter_hidden_size, adapter_rank=self.adapter_rank, adapter_bias=self.adapter_bias,
                )
        return self.config


@runtime_checkable
class SplitBackend(Protocol):
    """What the LightningModule needs from a backend."""

    name: str
    #: the trainable module (registered under the LightningModule); forward(input_ids) -> logits via :meth:`logits`
    model: nn.Module
    config: SplitLlamaConfig
    #: True: the backend runs forward and backward itself over micro-batches (``run_schedule`` and
    #: ``clip_grad_norm``, see ``splitllama.megatron.model``); the module uses manual optimisation
    manual_schedule: bool
    #: True: ``export_hf`` is collective (every rank calls it; model-parallel shards are gathered)
    collective_export: bool

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def parameter_counts(self) -> dict[str, int]:
        """``{"total", "trainable"}`` of the whole model (a model-parallel backend counts across its shards)."""
        ...

    def select_trainable(self, parts: Sequence[str], lora: dict[str, Any] | None) -> list[str]: ...

    def export_hf(self, out_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Path: ...


# ------------------------------------------------------------------------------------------ HF backend
#: HF split-model parameter name prefixes of each part ``finetune.trainable`` can name.
HF_PART_PREFIXES: dict[str, tuple[str, ...]] = PART_PREFIXES
HF_LORA_PARTS = {"first": "layers_first", "last": "layers_last"}


def lora_target_regex(target_modules: Sequence[str], parts: Sequence[str]) -> str:
    """A peft ``target_modules`` regex matching the named projections in the chosen donor layers only."""
    layer_lists = "|".join(HF_LORA_PARTS[p] for p in parts)
    modules = "|".join(re.escape(m) for m in target_modules)
    return rf"model\.({layer_lists})\.\d+\.(self_attn|mlp)\.({modules})"


class HFBackend:
    """The transformers implementation (:class:`splitllama.CustomSplitLLamaForCausalLM`)."""

    name = "hf"
    manual_schedule = False

    def __init__(self, spec: SplitModelSpec, options: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        from ..assembly import assemble

        self.spec = spec
        if spec.model_dir is not None:
            self.model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=getattr(torch, spec.dtype))
            self.model.config._attn_implementation = spec.attn_implementation
        else:
            self.model = assemble(
                spec.split_config(), adapter_checkpoint=spec.adapter_checkpoint, adapter_init=spec.adapter_init,
                calibration=spec.calibration, dtype=spec.dtype, attn_implementation=spec.attn_implementation, seed=spec.seed,
            )
        self.config: SplitLlamaConfig = self.model.config
        self.config.use_cache = False
        if options.get("gradient_checkpointing"):
            # non-reentrant: works when the layers' inputs need no grad (frozen first layers) and under FSDP2
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._lora = False
        self._lora_config: Any = None
        self._sharded = False

    @property
    def collective_export(self) -> bool:
        """Sharded (``parallel=fsdp``): the export gathers the shards, so every rank calls it."""
        return self._sharded

    def parallelize(self, mesh: Any, options: dict[str, Any]) -> None:
        """Shard the model over the data-parallel ``mesh`` with FSDP2 (:mod:`splitllama.training.sharding`)."""
        from .sharding import apply_fsdp

        apply_fsdp(
            self.model, mesh, param_dtype=options.get("fsdp_param_dtype"),
            sharding_strategy=options.get("fsdp_sharding_strategy", "FULL_SHARD"),
            wrap_decoder_layers=options.get("fsdp_wrap_decoder_layers", True),
        )
        self._sharded = True

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def parameter_counts(self) -> dict[str, int]:
        """Whole-model counts (a sharded parameter counts its full shape, not this rank's shard)."""
        params = list(self.model.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}

    def select_trainable(self, parts: Sequence[str], lora: dict[str, Any] | None) -> list[str]:
        """Freeze everything, then unfreeze ``parts`` and add LoRA (peft) if enabled; returns trainable names."""
        if lora and lora.get("enabled"):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                target_modules=lora_target_regex(lora["target_modules"], lora["parts"]), bias="none",
            )
            self.model = get_peft_model(self.model, config)
            self._lora = True
            self._lora_config = config
        prefixes = tuple(prefix for part in parts for prefix in HF_PART_PREFIXES[part])
        trainable = []
        for name, param in self.model.named_parameters():
            plain = self._plain_name(name)
            want = (self._lora and "lora_" in name) or (bool(prefixes) and plain.startswith(prefixes))
            param.requires_grad_(want)
            if want:
                trainable.append(name)
        if not trainable:
            raise ValueError(
                f"finetune.trainable={list(parts)}: no parameter matches (the {self.config.adapter} adapter has none?)"
            )
        return trainable

    @staticmethod
    def _plain_name(name: str) -> str:
        """Parameter name in the split model's own naming (peft adds ``base_model.model.`` and ``base_layer``)."""
        return name.removeprefix("base_model.model.").replace(".base_layer.", ".")

    def hf_model(self) -> nn.Module | None:
        """The split model with LoRA merged in (a copy when LoRA is on: training state is untouched).

        Sharded: a plain CPU copy built from the gathered full state dict (collective: every rank
        calls it); ``None`` on ranks other than 0.
        """
        if self._sharded:
            return self._gathered_model()
        if not self._lora:
            return self.model
        import copy

        return copy.deepcopy(self.model).merge_and_unload()

    def _gathered_model(self) -> nn.Module | None:
        import torch.distributed as dist

        from ..modeling_split_llama import CustomSplitLLamaForCausalLM
        from .sharding import full_state_dict

        state = full_state_dict(self.model)
        if dist.get_rank() != 0:
            return None
        with torch.device("meta"):
            model: nn.Module = CustomSplitLLamaForCausalLM(self.config)
            if self._lora:
                from peft import get_peft_model

                model = get_peft_model(model, self._lora_config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"gathered state dict does not fit the split model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        base = model.get_base_model() if self._lora else model
        base.model.reset_rotary_embeddings("cpu")  # non-persistent buffers: computed, not in the state dict
        return model.merge_and_unload() if self._lora else model

    def export_hf(self, out_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
        out = Path(out_dir)
        model = self.hf_model()
        if model is None:  # a sharded model's other ranks: they took part in the gather
            return out
        model.config.use_cache = True
        model.save_pretrained(out)
        model.config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out



__all__ = [
    "HFBackend",
    "SplitBackend",
    "SplitModelSpec",
    "lora_target_regex",
]
