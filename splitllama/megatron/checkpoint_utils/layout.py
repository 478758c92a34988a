"""How the megatron backend lays out the split model's tensors (its only addition to ``weight_map``).

Which donor tensor feeds which split-model tensor is :func:`splitllama.weight_map.plan_weights`;
this module says where such a tensor lives in the megatron modules and how it is cut:

* decoder-layer tensors (``LLAMA_LAYER_TENSORS``): unfused ones map to one megatron parameter;
  fused ones (``fused="qkv"`` / ``"gate_up"``) share ``self_attention.linear_qkv`` /
  ``mlp.linear_fc1``. ``split_dim`` gives the tensor-parallel cut (0 column, 1 row, None replicated).
* q/k/v sit in ``linear_qkv`` per query group: for each KV group, the queries of its heads, then
  its key, then its value; a tensor-parallel rank holds whole groups.
* gate/up sit in ``linear_fc1`` as ``[gate rows of this rank; up rows of this rank]``.
* embeddings and LM head are cut along the vocabulary, the adapter's column-parallel maps along
  their outputs and its row-parallel maps along their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...configuration_split_llama import SplitLlamaConfig
from ...weight_map import ADAPTER_PREFIX, LLAMA_LAYER_TENSORS, LayerTensor, part_prefixes

#: megatron parameter-name prefixes of the parts ``finetune.trainable`` names: the split model's
#: (:data:`splitllama.weight_map.PART_PREFIXES`) under the wrapper's ``module.``, the head part with the critic's value head
MEGATRON_PART_PREFIXES: dict[str, tuple[str, ...]] = part_prefixes("module.", heads=("value_head.",))

#: megatron parameter (relative to a TransformerLayer) of each LLaMA layer tensor, by fused group or name
MEGATRON_LAYER_PARAMS: dict[str, str] = {
    "input_layernorm.weight": "input_layernorm.weight",
    "qkv": "self_attention.linear_qkv.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "gate_up": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}

#: megatron parameter and TP cut of the split model's tensors outside the decoder layers
MEGATRON_GLOBAL_PARAMS: dict[str, tuple[str, int | None]] = {
    "model.embed_tokens.weight": ("model.embed_tokens.weight", 0),
    "model.norm.weight": ("model.norm.weight", None),
    "lm_head.weight": ("lm_head.weight", 0),
    "value_head.weight": ("value_head.weight", None),
    "value_head.bias": ("value_head.bias", None),
}

PART_MODULES = {"first": "model.layers_first.layers", "last": "model.layers_last.layers"}


@dataclass(frozen=True)
class LayerParam:
    """One megatron parameter of a decoder layer and the LLaMA tensors that fill it (in order)."""

    key: str  #: fused group (``qkv``/``gate_up``) or the tensor's name
    param: str  #: relative megatron parameter name
    tensors: tuple[LayerTensor, ...]


def layer_params() -> list[LayerParam]:
    """Group ``LLAMA_LAYER_TENSORS`` by the megatron parameter they fill (q/k/v and gate/up fused)."""
    groups: dict[str, list[LayerTensor]] = {}
    for tensor in LLAMA_LAYER_TENSORS:
        groups.setdefault(tensor.fused or tensor.name, []).append(tensor)
    return [LayerParam(key, MEGATRON_LAYER_PARAMS[key], tuple(ts)) for key, ts in groups.items()]


def adapter_split_dim(config: SplitLlamaConfig, relative_name: str) -> int | None:
    """TP cut of an adapter tensor (``adapter_linear_1.weight``...): see ``ParallelSplitAdapter``."""
    layer, _, kind = relative_name.partition(".")
    row_parallel = config.adapter == "linear" or layer == "adapter_linear_2"
    if row_parallel:
        return 1 if kind == "weight" else None
    return 0


def adapter_param_name(relative_name: str) -> str:
    return ADAPTER_PREFIX + relative_name


__all__ = [
    "MEGATRON_GLOBAL_PARAMS",
    "MEGATRON_LAYER_PARAMS",
    "PART_MODULES",
    "LayerParam",
    "adapter_param_name",
    "adapter_split_dim",
    "layer_params",
]
