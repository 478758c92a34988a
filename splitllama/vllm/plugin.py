"""vLLM plugin: makes ``LLM(model=split_dir)`` and ``vllm serve split_dir`` find the split model.

Installed as the ``vllm.general_plugins`` entry point ``splitllama`` (see pyproject.toml). vLLM
calls :func:`register` in every process it starts (front end, engine core, workers), before it
reads a model's config, so the architecture resolves everywhere. The model class is registered by
name: vLLM imports :mod:`splitllama.vllm.model` only in the processes that build the model.
"""

from __future__ import annotations

from ..configuration_split_llama import SPLIT_ARCHITECTURE

#: Lazy ``module:class`` reference vLLM imports when it builds the model.
MODEL_CLASS_PATH = "splitllama.vllm.model:CustomSplitLLamaForCausalLM"


def register() -> None:
    """Register the split config with transformers and the split model with vLLM (idempotent)."""
    import splitllama  # noqa: F401  (registers SplitLlamaConfig with transformers' AutoConfig)
    from vllm import ModelRegistry

    if SPLIT_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SPLIT_ARCHITECTURE, MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "register"]
