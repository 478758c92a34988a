"""Where each tensor of a saved split checkpoint lands in the vLLM model (no vLLM import here).

vLLM runs the split model as one stack of layers numbered globally, as
:func:`splitllama.weight_map.global_layer_index` defines: small-donor layers ``0..N-1``, the
adapter at ``N``, large-donor layers ``N+1..N+M``. It binds one KV cache per attention layer by
the integer in the layer's module path, so every layer needs its own number. vLLM also packs
q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``; which tensor fills which part
is read from the ``fused``/``shard`` fields of :data:`splitllama.weight_map.LLAMA_LAYER_TENSORS`.

So this module adds only vLLM's *layout* to the one weight map: it does not decide which donor
tensor goes where (that is :mod:`splitllama.weight_map`), only how a split-model name becomes a
vLLM parameter name and shard.

``check_split_checkpoint`` reads the safetensors headers of a saved split model and fails, naming
the tensors, when one is missing or has the wrong shape: before vLLM allocates anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, LazyCheckpoint
from ..configuration_split_llama import SplitConfigError, SplitLlamaConfig
from ..modeling_split_llama import CustomSplitLLamaForCausalLM
from ..weight_map import (
    ADAPTER_PREFIX,
    LLAMA_LAYER_TENSORS,
    SPLIT_WEIGHT_RULES,
    LayerTensor,
    adapter_tensor_names,
    global_layer_index,
    parse_split_name,
    plan_weights,
)

logger = logging.getLogger(__name__)

#: vLLM's name for each packed tensor of a LLaMA layer (``LayerTensor.fused`` -> module name).
FUSED_MODULES: dict[str, str] = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}

#: Template of a vLLM layer parameter: ``{}`` is the global layer index.
VLLM_LAYER_TEMPLATE = "model.layers.{}.{}"


def _vllm_tensor_name(tensor: LayerTensor) -> str:
    """``self_attn.k_proj.weight`` -> ``self_attn.qkv_proj.weight``; unfused names stay."""
    if tensor.fused is None:
        return tensor.name
    module, _leaf, suffix = tensor.name.rsplit(".", 2)
    return f"{module}.{FUSED_MODULES[tensor.fused]}.{suffix}"


#: Split-checkpoint layer tensor (relative to its layer) -> (vLLM name relative to its layer, shard).
VLLM_LAYER_NAMES: dict[str, tuple[str, str | int | None]] = {
    t.name: (_vllm_tensor_name(t), t.shard) for t in LLAMA_LAYER_TENSORS
}

#: Split-model names outside the layers (embeddings, final norm, LM head): vLLM keeps them.
TOP_LEVEL_NAMES: frozenset[str] = frozenset(r.target for r in SPLIT_WEIGHT_RULES if "{}" not in r.target)


@dataclass(frozen=True)
class VllmTarget:
    """A vLLM parameter (and the part of it a checkpoint tensor fills)."""

    param: str  #: vLLM parameter name, e.g. ``model.layers.5.self_attn.qkv_proj.weight``
    shard: str | int | None = None  #: ``q``/``k``/``v`` or ``0``/``1`` for packed parameters
    layer: int | None = None  #: global layer index (``None`` for embeddings, norm, head)


def adapter_layer_index(config: SplitLlamaConfig) -> int:
    """Global index of the adapter in the vLLM layer stack (``N``; see ``global_layer_index``)."""
    return config.num_layers_8


def num_vllm_layers(config: SplitLlamaConfig) -> int:
    """Length of the vLLM layer stack: N small-donor layers, the adapter, M large-donor layers."""
    return config.num_layers_8 + 1 + config.num_layers_70


def vllm_target(config: SplitLlamaConfig, name: str) -> VllmTarget | None:
    """The vLLM parameter that split-checkpoint tensor ``name`` fills; ``None`` if it has none.

    Raises :class:`CheckpointError` for a layer index the config does not have (a checkpoint
    saved from another layout).
    """
    part, index, rest = parse_split_name(name)
    if part is not None:
        assert index is not None
        count = config.num_layers_8 if part == "first" else config.num_layers_70
        if not 0 <= index < count:
            raise CheckpointError(
                f"tensor {name}: layers_{part} has {count} layer(s) in this config, so index {index} "
                "does not exist; the checkpoint and its config.json disagree"
            )
        if rest not in VLLM_LAYER_NAMES:
            return None
        layer = global_layer_index(config, part, index)
        relative, shard = VLLM_LAYER_NAMES[rest]
        return VllmTarget(VLLM_LAYER_TEMPLATE.format(layer, relative), shard, layer)
    if name.startswith(ADAPTER_PREFIX):
        layer = adapter_layer_index(config)
        return VllmTarget(VLLM_LAYER_TEMPLATE.format(layer, name[len(ADAPTER_PREFIX):]), None, layer)
    if name in TOP_LEVEL_NAMES:
        return VllmTarget(name)
    return None


def expected_checkpoint_tensors(config: SplitLlamaConfig) -> list[str]:
    """Every tensor a saved split checkpoint of ``config`` must hold, by split-model name."""
    return [src.target for src in plan_weights(config)] + list(adapter_tensor_names(config))


def expected_shapes(config: SplitLlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every split-checkpoint tensor, read off the Hugging Face model built on ``meta``."""
    with torch.device("meta"):
        model = CustomSplitLLamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_split_checkpoint(config: SplitLlamaConfig, path: str | os.PathLike[str]) -> list[str]:
    """Check a saved split model's safetensors against ``config``; return the names vLLM ignores.

    Raises :class:`CheckpointError` naming the directory and the missing tensors or wrong shapes.
    Reads headers only.
    """
    with LazyCheckpoint(path, role="split checkpoint") as checkpoint:
        present = set(checkpoint.names())
        expected = expected_checkpoint_tensors(config)
        missing = [n for n in expected if n not in present]
        if missing:
            raise CheckpointError(
                f"{Path(path)}: the split checkpoint lacks {len(missing)} tensor(s) its config.json needs "
                f"({config.describe()}): {missing[:12]}{' ...' if len(missing) > 12 else ''}"
            )
        shapes = expected_shapes(config)
        wrong = [
            f"{n}: {tuple(checkpoint.shape(n))} in the checkpoint, {shapes[n]} expected"
            for n in expected
            if n in shapes and tuple(checkpoint.shape(n)) != shapes[n]
        ]
        if wrong:
            raise CheckpointError(f"{Path(path)}: tensors of the wrong shape for this config: {wrong[:8]}")
        ignored = sorted(present - set(expected))
    for name in ignored:
        vllm_target(config, name)  # raises for out-of-range layer indices
    if ignored:
        logger.warning("%s: %d tensor(s) not used by the vLLM model: %s", path, len(ignored), ignored[:8])
    return ignored


def check_vllm_compatible(config: SplitLlamaConfig, tensor_parallel_size: int = 1) -> None:
    """Fail early, naming the field, for layouts the vLLM model cannot shard or run."""
    tp = tensor_parallel_size
    for field, donor in (("config_8b", config.config_8b), ("config_70b", config.config_70b)):
        if donor.num_attention_heads % tp:
            raise SplitConfigError(
                f"SplitLlamaConfig.{field}.num_attention_heads: {donor.num_attention_heads} is not divisible by "
                f"tensor_parallel_size={tp}"
            )
        kv = donor.num_key_value_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise SplitConfigError(
                f"SplitLlamaConfig.{field}.num_key_value_heads: {kv} KV heads cannot be split over or "
                f"replicated on tensor_parallel_size={tp}"
            )
        if getattr(donor, "layer_types", None):
            raise SplitConfigError(
                f"SplitLlamaConfig.{field}.layer_types: per-layer attention types are not supported by the "
                "vLLM split model (its layers are numbered globally)"
            )
    inner = {"mlp": config.adapter_hidden_size, "lowrank": config.adapter_rank}.get(config.adapter)
    if inner is not None and inner % tp:
        field = "adapter_hidden_size" if config.adapter == "mlp" else "adapter_rank"
        raise SplitConfigError(
            f"SplitLlamaConfig.{field}: {inner} is not divisible by tensor_parallel_size={tp} "
            "(the adapter's inner dimension is split across ranks)"
        )
    if config.adapter != "identity" and config.hidden_size_8 % tp:
        raise SplitConfigError(
            f"SplitLlamaConfig.config_8b.hidden_size: {config.hidden_size_8} is not divisible by "
            f"tensor_parallel_size={tp} (the adapter's input is split across ranks)"
        )


__all__ = [
    "FUSED_MODULES",
    "TOP_LEVEL_NAMES",
    "VLLM_LAYER_NAMES",
    "VllmTarget",
    "adapter_layer_index",
    "check_split_checkpoint",
    "check_vllm_compatible",
    "expected_checkpoint_tensors",
    "expected_shapes",
    "num_vllm_layers",
    "vllm_target",
]
