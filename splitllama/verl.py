"""veRL plug-in: makes a saved split model usable as veRL's FSDP actor, reference and critic model.

veRL 0.9.1 builds FSDP models with transformers' Auto classes from a model directory: the actor and
the reference with ``AutoModelForCausalLM`` (the class ``architectures`` names), the critic with
``AutoModelForTokenClassification``, whose output's ``.logits`` it reads as one value per token. It
finds out-of-tree models by importing a module first: a ``verl.plugins`` entry point (this package
installs ``splitllama``, loaded by ``import verl``), or ``actor_rollout_ref.model.external_lib=splitllama.verl``
(``VERL_USE_EXTERNAL_MODULES=splitllama.verl`` does the same). Importing :mod:`splitllama`
registers the split config and models with those Auto classes; this module checks that it did.

veRL logs a failing ``verl.plugins`` entry point at debug level only, so the entry point is the
top-level module ``splitllama_verl_plugin``, which reports any failure to import this one (the
package itself included) on stderr and in the log before re-raising.

Rollout: veRL syncs the actor's weights into vLLM in buckets of HF-named tensors; the vLLM model
(:mod:`splitllama.vllm.model`) takes them in any number of ``load_weights`` calls. Megatron: veRL
0.9.1 builds Megatron models only through Megatron-Bridge / mbridge, for which no split-model
bridge exists; :mod:`splitllama.megatron.registry` serves veRL versions that still read
``verl/models/registry.py``.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForTokenClassification

from . import CustomSplitLLamaForCausalLM, CustomSplitLLamaForValue
from .configuration_split_llama import SplitLlamaConfig

#: The transformers Auto class veRL loads each role with, and the split-model class it must find.
VERL_ROLES = {
    "actor": (AutoModelForCausalLM, CustomSplitLLamaForCausalLM),
    "ref": (AutoModelForCausalLM, CustomSplitLLamaForCausalLM),
    "critic": (AutoModelForTokenClassification, CustomSplitLLamaForValue),
}


def check_registered() -> None:
    """Raise ``RuntimeError`` unless every role's Auto class maps the split config to its class."""
    # (CONFIG_MAPPING.get misses registered types: its __getitem__ reads them)
    if SplitLlamaConfig.model_type not in CONFIG_MAPPING or CONFIG_MAPPING[SplitLlamaConfig.model_type] is not SplitLlamaConfig:
        raise RuntimeError(f"AutoConfig does not map model_type {SplitLlamaConfig.model_type!r} to SplitLlamaConfig")
    for role, (auto_class, model_class) in VERL_ROLES.items():
        found = auto_class._model_mapping.get(SplitLlamaConfig, None)
        if found is not model_class:
            raise RuntimeError(f"veRL's {role} loads with {auto_class.__name__}, which maps SplitLlamaConfig to {found}, "
                               f"not {model_class.__name__}")


check_registered()

__all__ = ["VERL_ROLES", "check_registered"]
