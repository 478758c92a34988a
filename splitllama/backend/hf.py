"""The transformers backend: :class:`HFBackend` builds the split model (:mod:`splitllama.assembly`),
selects what trains (parts, LoRA), shards it with FSDP2 where asked, and exports an HF checkpoint.

Which donor tensor lands where is decided by :mod:`splitllama.weight_map` in every backend;
a backend adds only its own layout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration_split_llama import SplitLlamaConfig
from ..errors import RunConfigError
from ..weight_map import PART_PREFIXES
from .interface import SplitBackend, SplitModelSpec

logger = logging.getLogger(__name__)

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
        """Shard the model over the data-parallel ``mesh`` with FSDP2 (:mod:`splitllama.backend.sharding`)."""
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
            none = f" (the {self.config.adapter} adapter has no weights)" if self.config.adapter == "identity" else ""
            raise RunConfigError(
                f"finetune.trainable={list(parts)}: no parameter of the split model is in these parts{none}; list parts "
                f"that hold weights, e.g. finetune.trainable=[last] or finetune=all, or enable LoRA (finetune=lora)"
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
