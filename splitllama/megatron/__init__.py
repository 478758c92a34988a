"""The megatron-core backend of the split LLaMA model.

Built from megatron-core parts (``VocabParallelEmbedding``, one ``TransformerBlock`` per donor
with that donor's own ``TransformerConfig``, tensor-parallel adapter, ``ColumnParallelLinear``
LM head) with a core attention on torch SDPA and rotary embeddings computed here, so it runs
without TransformerEngine or Apex, on GPU and on CPU.

``import splitllama`` does not import megatron-core: the names below are loaded on first use
and raise a clear ``ImportError`` (naming the extra to install) where megatron-core is absent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    # models (seed names)
    "ParallelCustomSplitLLamaModel": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaForCausalLM": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaModelRmPad": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaForCausalLMRmPad": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaForValueRmPad": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaForCausalLMRmPadPP": "modeling_split_llama_megatron",
    "ParallelCustomSplitLLamaForValueRmPadPP": "modeling_split_llama_megatron",
    "SplitStageLayout": "modeling_split_llama_megatron",
    "pack_sequences": "modeling_split_llama_megatron",
    # loaders and export
    "load_hf_weights_to_custom_split_llama": "checkpoint_utils.custom_split_llama_loader",
    "load_custom_split_llama_weights": "checkpoint_utils.custom_split_llama_loader",
    "load_hf_split_checkpoint": "checkpoint_utils.custom_split_llama_loader",
    "export_hf_split_checkpoint": "checkpoint_utils.custom_split_llama_saver",
    # parallel state and Lightning
    "ModelRegistry": "registry",
    "initialize_megatron_parallel": "parallel",
    "destroy_megatron_parallel": "parallel",
    "make_model_parallel_config": "parallel",
    "build_megatron_split_model": "model",
    "export_hf": "model",
    "MegatronStrategy": "strategy",
    "build_megatron_backend": "backend",
    "MegatronBackendSpec": "backend",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'splitllama.megatron' has no attribute {name!r}")


if TYPE_CHECKING:
    from .checkpoint_utils.custom_split_llama_loader import (
        load_custom_split_llama_weights,
        load_hf_split_checkpoint,
        load_hf_weights_to_custom_split_llama,
    )
    from .checkpoint_utils.custom_split_llama_saver import export_hf_split_checkpoint
    from .backend import MegatronBackendSpec, build_megatron_backend
    from .model import build_megatron_split_model, export_hf
    from .strategy import MegatronStrategy
    from .modeling_split_llama_megatron import (
        ParallelCustomSplitLLamaForCausalLM,
        ParallelCustomSplitLLamaForCausalLMRmPad,
        ParallelCustomSplitLLamaForCausalLMRmPadPP,
        ParallelCustomSplitLLamaForValueRmPad,
        ParallelCustomSplitLLamaForValueRmPadPP,
        ParallelCustomSplitLLamaModel,
        ParallelCustomSplitLLamaModelRmPad,
        SplitStageLayout,
        pack_sequences,
    )
    from .parallel import destroy_megatron_parallel, initialize_megatron_parallel, make_model_parallel_config
    from .registry import ModelRegistry

__all__ = sorted(_LAZY)
