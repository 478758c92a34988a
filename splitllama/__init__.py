"""splitllama: split LLaMA models (small-donor layers -> adapter -> large-donor layers).

Importing the package registers the split config and models with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(saved_dir)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

from ._lazy import lazy_getattr

from .configuration_split_llama import ADAPTER_TYPES, SPLIT_ARCHITECTURE, SplitConfigError, SplitLlamaConfig
from .modeling_split_llama import (
    CustomSplitLLamaForCausalLM,
    CustomSplitLLamaForValue,
    CustomSplitLLamaModel,
    CustomSplitLLamaPreTrainedModel,
    SplitLlamaAdapter,
    register_seed_dir_assembler,
)

__version__ = "0.1.0"

AutoConfig.register(SplitLlamaConfig.model_type, SplitLlamaConfig, exist_ok=True)
AutoModel.register(SplitLlamaConfig, CustomSplitLLamaModel, exist_ok=True)
AutoModelForCausalLM.register(SplitLlamaConfig, CustomSplitLLamaForCausalLM, exist_ok=True)
# a critic (veRL loads critics with AutoModelForTokenClassification and reads .logits: one value per token)
AutoModelForTokenClassification.register(SplitLlamaConfig, CustomSplitLLamaForValue, exist_ok=True)
# save_pretrained copies the config and modeling modules next to the weights and writes an
# auto_map, so a saved model also loads with trust_remote_code=True where splitllama is absent.
SplitLlamaConfig.register_for_auto_class()
CustomSplitLLamaModel.register_for_auto_class("AutoModel")
CustomSplitLLamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# a seed-style directory (``assemble_from_donors``) loads by assembling its donors: the model names the
# assembler it is given here, so the model layer does not reach up into the assembly code
register_seed_dir_assembler("splitllama.assembly:build_from_seed_dir")

_LAZY = {
    "build_split_model": "assembly",
    "build_from_seed_dir": "assembly",
    "fit_lstsq_adapter": "assembly",
    "LazyCheckpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "plan_weights": "weight_map",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


if TYPE_CHECKING:
    from .assembly import build_from_seed_dir, build_split_model, fit_lstsq_adapter
    from .checkpoint import CheckpointError, LazyCheckpoint
    from .weight_map import plan_weights

__all__ = [
    "ADAPTER_TYPES",
    "SPLIT_ARCHITECTURE",
    "CheckpointError",
    "CustomSplitLLamaForCausalLM",
    "CustomSplitLLamaForValue",
    "CustomSplitLLamaModel",
    "CustomSplitLLamaPreTrainedModel",
    "LazyCheckpoint",
    "SplitConfigError",
    "SplitLlamaAdapter",
    "SplitLlamaConfig",
    "build_from_seed_dir",
    "build_split_model",
    "fit_lstsq_adapter",
    "plan_weights",
]
