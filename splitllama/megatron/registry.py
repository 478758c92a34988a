"""Which megatron classes implement which HF architecture (the seed's ``ModelRegistry``).

``config.architectures[0]`` names the architecture; the registry gives the pipeline-parallel
causal-LM (actor) class, the pipeline-parallel value (critic) class, and the packed causal-LM
class. Construct a model with ``model_cls(config=split_config, megatron_config=megatron_config)``.
Nothing here imports megatron-core until a class is asked for.

For veRL versions that still read ``verl/models/registry.py``; veRL 0.9.1 no longer calls it and builds
Megatron models only through Megatron-Bridge / mbridge (see the README's "RL post-training").
"""

from __future__ import annotations

import importlib

from ..configuration_split_llama import SPLIT_ARCHITECTURE

#: architecture -> (module under splitllama.megatron, (actor PP class, critic PP class, packed actor class))
_MODELS: dict[str, tuple[str, tuple[str, str, str]]] = {
    SPLIT_ARCHITECTURE: (
        "modeling_split_llama_megatron",
        (
            "ParallelCustomSplitLLamaForCausalLMRmPadPP",
            "ParallelCustomSplitLLamaForValueRmPadPP",
            "ParallelCustomSplitLLamaForCausalLMRmPad",
        ),
    ),
}


class ModelRegistry:
    """Megatron model classes by HF architecture name."""

    @staticmethod
    def get_supported_archs() -> list[str]:
        return list(_MODELS)

    @staticmethod
    def load_model_cls(model_arch: str, value: bool = False) -> type:
        """The pipeline-parallel causal-LM class of ``model_arch``, or its value (critic) class."""
        if model_arch not in _MODELS:
            raise ValueError(
                f"architectures: {model_arch!r} has no megatron implementation; supported: {', '.join(_MODELS)}"
            )
        module_name, classes = _MODELS[model_arch]
        module = importlib.import_module(f".{module_name}", __package__)
        return getattr(module, classes[1] if value else classes[0])


__all__ = ["ModelRegistry"]
