"""Which donor tensor goes where: the one declarative weight-name map of a split model.

Every loader reads this module: the Hugging Face assembly (``splitllama.assembly``), the
Megatron loaders and the vLLM ``load_weights``. Backends differ only in how they lay a tensor out
(fused q/k/v, tensor-parallel slices), never in which donor tensor lands in which place.

Names use ``{}`` for a layer index, as in litgpt's and mergekit's conversion tables. A
:class:`WeightRule` maps a donor name template to a split-model name template; :func:`plan_weights`
expands the rules for one :class:`SplitLlamaConfig` into concrete :class:`TensorSource` entries.

Split-model parameter names (HF backend, also the names inside a saved split checkpoint)::

    model.embed_tokens.weight                  <- small donor  model.embed_tokens.weight
    model.layers_first.{i}.<layer tensor>      <- small donor  model.layers.{layers_8[i]}.<layer tensor>
    model.adapter.adapter_linear_{1,2}.{weight,bias}   (adapter checkpoint or initialisation)
    model.layers_last.{j}.<layer tensor>       <- large donor  model.layers.{layers_70[j]}.<layer tensor>
    model.norm.weight                          <- large donor  model.norm.weight
    lm_head.weight                             <- large donor  lm_head.weight (or its embed_tokens if tied)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .configuration_split_llama import SplitLlamaConfig

Donor = Literal["small", "large"]
LayerPart = Literal["first", "last"]


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of a LLaMA decoder layer, and how fused backends pack it.

    ``fused`` names the packed tensor (``qkv`` or ``gate_up``) and ``shard`` the part this
    tensor fills in it (``q``/``k``/``v`` or ``0``/``1``); ``None`` for unfused tensors.
    ``split_dim`` is the dimension tensor parallelism shards (0: column parallel, 1: row
    parallel, ``None``: replicated).
    """

    name: str
    fused: str | None = None
    shard: str | int | None = None
    split_dim: int | None = None


#: The tensors of one LLaMA decoder layer, relative to ``model.layers.{}.``.
LLAMA_LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor("input_layernorm.weight"),
    LayerTensor("self_attn.q_proj.weight", fused="qkv", shard="q", split_dim=0),
    LayerTensor("self_attn.k_proj.weight", fused="qkv", shard="k", split_dim=0),
    LayerTensor("self_attn.v_proj.weight", fused="qkv", shard="v", split_dim=0),
    LayerTensor("self_attn.o_proj.weight", split_dim=1),
    LayerTensor("post_attention_layernorm.weight"),
    LayerTensor("mlp.gate_proj.weight", fused="gate_up", shard=0, split_dim=0),
    LayerTensor("mlp.up_proj.weight", fused="gate_up", shard=1, split_dim=0),
    LayerTensor("mlp.down_proj.weight", split_dim=1),
)


@dataclass(frozen=True)
class WeightRule:
    """Donor name template -> split-model name template (``{}`` is a layer index)."""

    donor: Donor
    source: str
    target: str
    #: Read instead of a missing ``source`` when the donor's config ties its embeddings
    #: (``tie_word_embeddings``: ``lm_head`` is ``embed_tokens``); never for an untied donor.
    fallback: str | None = None


#: The split model's layout, written once.
SPLIT_WEIGHT_RULES: tuple[WeightRule, ...] = (
    WeightRule("small", "model.embed_tokens.weight", "model.embed_tokens.weight"),
    *(WeightRule("small", f"model.layers.{{}}.{t.name}", f"model.layers_first.{{}}.{t.name}") for t in LLAMA_LAYER_TENSORS),
    *(WeightRule("large", f"model.layers.{{}}.{t.name}", f"model.layers_last.{{}}.{t.name}") for t in LLAMA_LAYER_TENSORS),
    WeightRule("large", "model.norm.weight", "model.norm.weight"),
    WeightRule("large", "lm_head.weight", "lm_head.weight", fallback="model.embed_tokens.weight"),
)

ADAPTER_PREFIX = "model.adapter."

#: The parts ``finetune.trainable`` names -> the split-model name prefixes of their tensors (the
#: targets of :data:`SPLIT_WEIGHT_RULES`, and the adapter); every backend derives its own from this.
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "adapter": (ADAPTER_PREFIX,),
    "first": ("model.layers_first.",),
    "last": ("model.layers_last.",),
    "embeddings": ("model.embed_tokens.",),
    "norm": ("model.norm.",),
    "head": ("lm_head.",),
    "all": ("",),
}


def part_prefixes(root: str = "", heads: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """:data:`PART_PREFIXES` under a backend's module ``root`` (``module.`` for megatron's wrapper);
    ``heads`` adds the names of other output heads (a critic's ``value_head.``) to the ``head`` part."""
    return {part: tuple(root + p if p else "" for p in prefixes) + (tuple(root + h for h in heads) if part == "head" else ())
            for part, prefixes in PART_PREFIXES.items()}


@dataclass(frozen=True)
class TensorSource:
    """Where one split-model tensor comes from."""

    target: str  #: split-model name, e.g. ``model.layers_last.0.mlp.up_proj.weight``
    donor: Donor
    source: str  #: donor name, e.g. ``model.layers.77.mlp.up_proj.weight``
    fallback: str | None = None
    part: LayerPart | None = None  #: ``first``/``last`` for decoder-layer tensors
    split_layer: int | None = None  #: position within ``layers_first``/``layers_last``
    donor_layer: int | None = None  #: layer index inside the donor
    layer_tensor: LayerTensor | None = None


def _layer_tensor(rule: WeightRule) -> LayerTensor | None:
    for t in LLAMA_LAYER_TENSORS:
        if rule.source.endswith("." + t.name) and "{}" in rule.source:
            return t
    return None


def plan_weights(config: SplitLlamaConfig) -> list[TensorSource]:
    """Expand :data:`SPLIT_WEIGHT_RULES` for ``config``: every donor-sourced tensor of the model.

    The adapter is not listed: it comes from an adapter checkpoint or an initialisation.
    """
    plan: list[TensorSource] = []
    for rule in SPLIT_WEIGHT_RULES:
        if "{}" not in rule.source:
            donor_config = config.config_8b if rule.donor == "small" else config.config_70b
            tied = bool(getattr(donor_config, "tie_word_embeddings", False))
            plan.append(TensorSource(rule.target, rule.donor, rule.source, rule.fallback if tied else None))
            continue
        part: LayerPart = "first" if rule.target.startswith("model.layers_first.") else "last"
        donor_layers = config.layers_8 if part == "first" else config.layers_70
        for split_idx, donor_idx in enumerate(donor_layers):
            plan.append(
                TensorSource(
                    target=rule.target.format(split_idx),
                    donor=rule.donor,
                    source=rule.source.format(donor_idx),
                    fallback=rule.fallback.format(donor_idx) if rule.fallback else None,
                    part=part,
                    split_layer=split_idx,
                    donor_layer=donor_idx,
                    layer_tensor=_layer_tensor(rule),
                )
            )
    return sorted(plan, key=_layout_order)


def _layout_order(src: TensorSource) -> tuple[int, int, str]:
    """Model order: embeddings, first layers, last layers, norm, head (reads donors sequentially)."""
    if src.part == "first":
        return (1, src.split_layer or 0, src.target)
    if src.part == "last":
        return (2, src.split_layer or 0, src.target)
    return (0 if "embed_tokens" in src.target else 3, 0, src.target)


def adapter_tensor_names(config: SplitLlamaConfig) -> dict[str, tuple[int, ...]]:
    """Full split-model names and shapes of the adapter parameters."""
    return {ADAPTER_PREFIX + name: shape for name, shape in config.adapter_shapes.items()}


def global_layer_index(config: SplitLlamaConfig, part: LayerPart, split_layer: int) -> int:
    """Global numbering of the split model's layers: first 0..N-1, adapter N, last N+1..N+M.

    vLLM binds one KV cache per attention layer by the integer in its module path, so the two
    donors' layers cannot both start from 0; this is the numbering every backend uses where one
    index space is needed (vLLM module names, transformers' KV-cache layer slots use ``N + j``).
    """
    n = config.num_layers_8
    return split_layer if part == "first" else n + 1 + split_layer


def parse_split_name(name: str) -> tuple[LayerPart | None, int | None, str]:
    """Split ``model.layers_last.3.mlp.up_proj.weight`` into (``last``, 3, ``mlp.up_proj.weight``).

    Non-layer names give ``(None, None, name)``; this is how backends read a saved split checkpoint.
    """
    for part, prefix in (("first", "model.layers_first."), ("last", "model.layers_last.")):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            return part, int(index), rest  # type: ignore[return-value]
    return None, None, name


__all__ = [
    "ADAPTER_PREFIX",
    "PART_PREFIXES",
    "LLAMA_LAYER_TENSORS",
    "SPLIT_WEIGHT_RULES",
    "LayerTensor",
    "TensorSource",
    "WeightRule",
    "adapter_tensor_names",
    "global_layer_index",
    "parse_split_name",
    "part_prefixes",
    "plan_weights",
]
