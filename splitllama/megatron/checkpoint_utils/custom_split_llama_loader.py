"""Load donor (or split-model) weights into the megatron split model, each rank only its own slices.

Three sources, one procedure:

* :func:`load_hf_weights_to_custom_split_llama`: two ordinary HF LLaMA checkpoints (the donors)
  and an adapter checkpoint, read lazily (only the tensors of this pipeline stage, and of those
  only this tensor-parallel rank's rows or columns, via ``LazyCheckpoint.get_slice``);
* :func:`load_custom_split_llama_weights`: the donors' state dicts already in memory;
* :func:`load_hf_split_checkpoint`: a split model saved by the HF backend (or by our export).

Which donor tensor fills which split-model tensor comes from :func:`splitllama.weight_map.plan_weights`;
:mod:`.layout` says where that tensor sits in the megatron modules. Before any tensor byte is read,
every needed tensor is looked up and its full shape checked against the HF split model's
(built on the meta device), and all problems are reported at once. After loading, every
parameter of the model must have been written: an unfilled parameter is an error, except the
adapter and value head, whose initialisation is then named in the log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from ...checkpoint import CheckpointError, LazyCheckpoint, load_adapter_state
from ...configuration_split_llama import SplitLlamaConfig
from ...weight_map import ADAPTER_PREFIX, TensorSource, adapter_tensor_names, plan_weights
from .._compat import require_megatron
from .layout import MEGATRON_GLOBAL_PARAMS, PART_MODULES, adapter_split_dim, layer_params

require_megatron()

from megatron.core import parallel_state  # noqa: E402

logger = logging.getLogger(__name__)

ADAPTER_INITS = ("random", "identity")


# ------------------------------------------------------------------------------------------ readers
class TensorReader:
    """Full tensors or slices from a lazily read checkpoint or from an in-memory state dict."""

    def __init__(self, role: str, checkpoint: LazyCheckpoint | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        self.role = role
        self.checkpoint = checkpoint
        self.state = state

    def __contains__(self, name: str) -> bool:
        return name in (self.checkpoint if self.checkpoint is not None else self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.checkpoint is not None:
            return tuple(self.checkpoint.shape(name))
        return tuple(self.state[name].shape)

    def read(self, name: str, dtype: torch.dtype, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``tensor`` (``dim`` None) or ``tensor[..., start:stop, ...]`` along ``dim``, as ``dtype``."""
        if self.checkpoint is not None:
            if dim is None:
                return self.checkpoint.get(name, dtype)
            return self.checkpoint.get_slice(name, dim, start, stop, dtype)
        tensor = self.state[name]
        if dim is not None:
            tensor = tensor.narrow(dim, start, stop - start)
        return tensor.to(dtype)

    def describe(self) -> str:
        return f"{self.role} ({self.checkpoint.path})" if self.checkpoint is not None else f"{self.role} (state dict)"


@dataclass
class SourceMap:
    """Where each split-model tensor (HF name) is read from."""

    lookup: Callable[[str], tuple[TensorReader, str] | None]
    adapter: dict[str, torch.Tensor] | TensorReader | None  #: relative names, or a reader of ``model.adapter.*``
    value_head: TensorReader | None = None


def donor_sources(config: SplitLlamaConfig, small: TensorReader, large: TensorReader) -> Callable[[str], tuple[TensorReader, str] | None]:
    """Split-model name -> (donor reader, donor tensor name), following ``plan_weights`` (tied heads too)."""
    plan: dict[str, TensorSource] = {src.target: src for src in plan_weights(config)}

    def lookup(target: str) -> tuple[TensorReader, str] | None:
        src = plan.get(target)
        if src is None:
            return None
        reader = small if src.donor == "small" else large
        if src.source not in reader and src.fallback and src.fallback in reader:
            return reader, src.fallback
        return reader, src.source

    return lookup


def split_sources(config: SplitLlamaConfig, split: TensorReader) -> Callable[[str], tuple[TensorReader, str] | None]:
    """Split-model name -> the same name in a saved split checkpoint."""
    targets = {src.target for src in plan_weights(config)}

    def lookup(target: str) -> tuple[TensorReader, str] | None:
        return (split, target) if target in targets else None

    return lookup


# ------------------------------------------------------------------------------------------ helpers
def unwrap_models(wrapped_models: Any) -> list[nn.Module]:
    """The split-model modules inside DDP/Float16 wrappers (megatron and torch use ``.module``)."""
    from ..modeling_split_llama_megatron import ParallelSplitLlama

    models = wrapped_models if isinstance(wrapped_models, (list, tuple)) else [wrapped_models]
    out = []
    for model in models:
        while not isinstance(model, ParallelSplitLlama) and hasattr(model, "module"):
            model = model.module
        if not isinstance(model, ParallelSplitLlama):
            raise TypeError(f"wrapped_models: {type(model).__name__} is not a megatron split model (ParallelCustomSplitLLama*)")
        out.append(model)
    return out


def tp_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _cut(total: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if total % tp:
        raise ValueError(f"{what}: size {total} is not divisible by tensor parallel size {tp}")
    size = total // tp
    return rank * size, (rank + 1) * size


def hf_expected_shapes(config: SplitLlamaConfig, value: bool) -> dict[str, tuple[int, ...]]:
    """Full shapes of the HF split model's tensors (built on the meta device: no memory)."""
    from ...modeling_split_llama import CustomSplitLLamaForCausalLM, CustomSplitLLamaForValue

    with torch.device("meta"):
        model = (CustomSplitLLamaForValue if value else CustomSplitLLamaForCausalLM)(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class LoadItem:
    """One megatron parameter and how to build its local tensor."""

    param: str
    targets: tuple[str, ...]  #: HF split-model names feeding it
    build: Callable[[torch.dtype], torch.Tensor]


def _layer_items(
    model: nn.Module, config: SplitLlamaConfig, sources: SourceMap, problems: list[str], expected: dict[str, tuple[int, ...]]
) -> list[LoadItem]:
    rank, tp = tp_rank_and_size()
    items: list[LoadItem] = []
    layout = model.layout
    for part, split_range in (("first", layout.first), ("last", layout.last)):
        donor = config.config_8b if part == "first" else config.config_70b
        head_dim = getattr(donor, "head_dim", None) or donor.hidden_size // donor.num_attention_heads
        heads, groups = donor.num_attention_heads, donor.num_key_value_heads
        for local, split_index in enumerate(split_range):
            for group in layer_params():
                targets = tuple(f"model.layers_{part}.{split_index}.{t.name}" for t in group.tensors)
                located = [_locate(t, sources, problems, expected) for t in targets]
                if any(loc is None for loc in located):
                    continue
                param = f"{PART_MODULES[part]}.{local}.{group.param}"
                if group.key == "qkv":
                    build = _qkv_builder(located, heads, groups, head_dim, rank, tp)
                elif group.key == "gate_up":
                    build = _gate_up_builder(located, donor.intermediate_size, rank, tp)
                else:
                    build = _sliced_builder(located[0], group.tensors[0].split_dim, rank, tp, param)
                items.append(LoadItem(param, targets, build))
    return items


def _locate(target: str, sources: SourceMap, problems: list[str], expected: dict[str, tuple[int, ...]]) -> tuple[TensorReader, str] | None:
    found = sources.lookup(target)
    if found is None:
        problems.append(f"no source for {target}")
        return None
    reader, name = found
    if name not in reader:
        problems.append(f"missing tensor {name!r} in {reader.describe()}")
        return None
    shape = reader.shape(name)
    if target in expected and shape != expected[target]:
        problems.append(f"{reader.describe()}: tensor {name!r} has shape {list(shape)}, but {target} needs {list(expected[target])}")
        return None
    return reader, name


def _sliced_builder(located: tuple[TensorReader, str], split_dim: int | None, rank: int, tp: int, what: str):
    reader, name = located

    def build(dtype: torch.dtype) -> torch.Tensor:
        if split_dim is None or tp == 1:
            return reader.read(name, dtype)
        start, stop = _cut(reader.shape(name)[split_dim], tp, rank, what)
        return reader.read(name, dtype, split_dim, start, stop)

    return build


def _qkv_builder(located: list[tuple[TensorReader, str]], heads: int, groups: int, head_dim: int, rank: int, tp: int):
    """``linear_qkv`` of this rank: for each of its KV groups, [that group's q heads; k; v]."""
    (q_reader, q_name), (k_reader, k_name), (v_reader, v_name) = located
    per_group = heads // groups
    local_groups = groups // tp

    def build(dtype: torch.dtype) -> torch.Tensor:
        q_rows = local_groups * per_group * head_dim
        kv_rows = local_groups * head_dim
        q = q_reader.read(q_name, dtype, 0, rank * q_rows, (rank + 1) * q_rows)
        k = k_reader.read(k_name, dtype, 0, rank * kv_rows, (rank + 1) * kv_rows)
        v = v_reader.read(v_name, dtype, 0, rank * kv_rows, (rank + 1) * kv_rows)
        hidden = q.shape[1]
        fused = torch.cat(
            [q.view(local_groups, per_group * head_dim, hidden), k.view(local_groups, head_dim, hidden), v.view(local_groups, head_dim, hidden)],
            dim=1,
        )
        return fused.reshape(-1, hidden)

    return build


def _gate_up_builder(located: list[tuple[TensorReader, str]], intermediate: int, rank: int, tp: int):
    """``linear_fc1`` of this rank: [this rank's gate rows; this rank's up rows]."""
    (g_reader, g_name), (u_reader, u_name) = located
    start, stop = _cut(intermediate, tp, rank, "intermediate_size")

    def build(dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([g_reader.read(g_name, dtype, 0, start, stop), u_reader.read(u_name, dtype, 0, start, stop)], dim=0)

    return build


def _global_items(
    model: nn.Module, config: SplitLlamaConfig, sources: SourceMap, problems: list[str], expected: dict[str, tuple[int, ...]]
) -> list[LoadItem]:
    rank, tp = tp_rank_and_size()
    params = dict(model.named_parameters())
    items = []
    for target in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        param, split_dim = MEGATRON_GLOBAL_PARAMS[target]
        if param not in params:
            continue  # not on this pipeline stage, or not this kind of head
        located = _locate(target, sources, problems, expected)
        if located is not None:
            items.append(LoadItem(param, (target,), _sliced_builder(located, split_dim, rank, tp, target)))
    return items


def _adapter_items(model: nn.Module, config: SplitLlamaConfig, sources: SourceMap, problems: list[str]) -> list[LoadItem]:
    if not model.layout.has_adapter or config.adapter == "identity":
        return []
    rank, tp = tp_rank_and_size()
    expected = adapter_tensor_names(config)
    adapter = sources.adapter
    if isinstance(adapter, TensorReader):
        state = {name[len(ADAPTER_PREFIX):]: None for name in expected if name in adapter}
        reader = adapter
        names = {rel: ADAPTER_PREFIX + rel for rel in state}
    else:
        state = adapter or {}
        reader = TensorReader("adapter_checkpoint", state=state)
        names = {rel: rel for rel in state}
    present = {ADAPTER_PREFIX + rel for rel in state}
    for name in sorted(set(expected) - present):
        problems.append(f"adapter: missing {name[len(ADAPTER_PREFIX):]!r} (shape {list(expected[name])})")
    for name in sorted(present - set(expected)):
        problems.append(f"adapter: unexpected {name[len(ADAPTER_PREFIX):]!r} for a {config.adapter} adapter")
    items = []
    for full in sorted(present & set(expected)):
        rel = full[len(ADAPTER_PREFIX):]
        shape = reader.shape(names[rel])
        if shape != tuple(expected[full]):
            problems.append(f"adapter: {rel!r} has shape {list(shape)}, expected {list(expected[full])}")
            continue
        items.append(LoadItem(full, (full,), _sliced_builder((reader, names[rel]), adapter_split_dim(config, rel), rank, tp, full)))
    return items


def _value_items(model: nn.Module, sources: SourceMap) -> list[LoadItem]:
    if not hasattr(model, "value_head") or sources.value_head is None:
        return []
    reader = sources.value_head
    if "value_head.weight" not in reader:
        return []
    return [LoadItem(f"value_head.{n}", (f"value_head.{n}",), _sliced_builder((reader, f"value_head.{n}"), None, 0, 1, n)) for n in ("weight", "bias")]


# ------------------------------------------------------------------------------------------ loading
@torch.no_grad()
def load_split_weights(
    wrapped_models: Any,
    config: SplitLlamaConfig,
    sources: SourceMap,
    params_dtype: torch.dtype,
    *,
    is_value_model: bool = False,
    adapter_init: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Fill every parameter of ``wrapped_models`` from ``sources``; returns the filled names (of the first model)."""
    models = unwrap_models(wrapped_models)
    expected = hf_expected_shapes(config, value=is_value_model)
    filled_first: list[str] = []
    for model in models:
        problems: list[str] = []
        items = _layer_items(model, config, sources, problems, expected) + _global_items(model, config, sources, problems, expected)
        init_adapter = model.layout.has_adapter and config.adapter != "identity" and sources.adapter is None
        if init_adapter:
            method = adapter_init or "random"
            if method not in ADAPTER_INITS:
                raise ValueError(f"adapter_init: the megatron loader takes {', '.join(ADAPTER_INITS)} (or an adapter checkpoint), got {method!r}")
            sources_adapter = initial_adapter_state(config, method, seed)
            logger.warning("adapter (%s): no adapter checkpoint; initialised %r (seed %d)", config.adapter, method, seed)
            items += _adapter_items(model, config, SourceMap(sources.lookup, sources_adapter), problems)
        else:
            items += _adapter_items(model, config, sources, problems)
        items += _value_items(model, sources)
        if problems:
            raise CheckpointError("cannot load the megatron split model:\n  " + "\n  ".join(problems))
        params = dict(model.named_parameters())
        filled: set[str] = set()
        for item in items:
            param = params.get(item.param)
            if param is None:
                raise RuntimeError(f"megatron split model has no parameter {item.param} (for {item.targets})")
            tensor = item.build(params_dtype)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{item.targets}: built a {list(tensor.shape)} slice for {item.param} of shape {list(param.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            filled.add(item.param)
        if hasattr(model, "value_head") and "value_head.weight" not in filled:
            nn.init.zeros_(model.value_head.weight)
            nn.init.zeros_(model.value_head.bias)
            filled.update({"value_head.weight", "value_head.bias"})
            logger.info("value_head initialised to zeros")
        leftover = sorted(set(params) - filled)
        if leftover:
            raise RuntimeError(f"megatron split model parameters not loaded from any source: {leftover}")
        if not filled_first:
            filled_first = sorted(filled)
    return filled_first


def initial_adapter_state(config: SplitLlamaConfig, method: str, seed: int) -> dict[str, torch.Tensor]:
    """Full adapter tensors from the HF backend's named initialisation (same values for the same seed)."""
    from ...assembly import initialise_adapter
    from ...modeling_split_llama import SplitLlamaAdapter

    adapter = SplitLlamaAdapter(config)
    holder = SimpleNamespace(config=config, model=SimpleNamespace(adapter=adapter))
    initialise_adapter(holder, method, seed=seed)  # type: ignore[arg-type]
    return {name: p.detach().clone() for name, p in adapter.named_parameters()}


def _split_config(config: Any) -> SplitLlamaConfig:
    if isinstance(config, SplitLlamaConfig):
        return config
    return SplitLlamaConfig(**(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def load_hf_weights_to_custom_split_llama(
    model_path_8b: str | os.PathLike[str],
    model_path_70b: str | os.PathLike[str],
    adapter_checkpoint_path: str | os.PathLike[str] | None,
    wrapped_models: Any,
    config: SplitLlamaConfig,
    params_dtype: torch.dtype,
    is_value_model: bool = False,
    *,
    adapter_init: str | None = None,
    seed: int = 0,
) -> None:
    """Load the donors' HF checkpoints (and an adapter checkpoint) into the megatron split model.

    Each rank reads only its pipeline stage's tensors and of those only its tensor-parallel
    slices. Without ``adapter_checkpoint_path`` the adapter is initialised by ``adapter_init``
    (``random``, the default, or ``identity``; logged). A value model's head starts at zero.
    """
    config = _split_config(config)
    small = TensorReader("path8b", LazyCheckpoint(model_path_8b, role="path8b"))
    large = TensorReader("path70b", LazyCheckpoint(model_path_70b, role="path70b"))
    adapter = load_adapter_state(adapter_checkpoint_path) if adapter_checkpoint_path is not None else None
    if adapter is None and config.adapter == "identity":
        adapter = {}
    sources = SourceMap(donor_sources(config, small, large), adapter)
    load_split_weights(wrapped_models, config, sources, params_dtype, is_value_model=is_value_model, adapter_init=adapter_init, seed=seed)


def load_custom_split_llama_weights(
    state_dict_8b: dict[str, torch.Tensor],
    state_dict_70b: dict[str, torch.Tensor],
    adapter_state_dict: dict[str, torch.Tensor] | None,
    wrapped_models: Any,
    config: SplitLlamaConfig,
    params_dtype: torch.dtype,
    *,
    is_value_model: bool = False,
    adapter_init: str | None = None,
    seed: int = 0,
) -> None:
    """Load from the donors' state dicts (HF names) already in memory; adapter keys as in an adapter checkpoint."""
    config = _split_config(config)
    small = TensorReader("state_dict_8b", state=state_dict_8b)
    large = TensorReader("state_dict_70b", state=state_dict_70b)
    adapter = None
    if adapter_state_dict is not None:
        adapter = {}
        for key, value in adapter_state_dict.items():
            for prefix in ("model.adapter.", "adapter."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            adapter[key] = value
    elif config.adapter == "identity":
        adapter = {}
    sources = SourceMap(donor_sources(config, small, large), adapter)
    load_split_weights(wrapped_models, config, sources, params_dtype, is_value_model=is_value_model, adapter_init=adapter_init, seed=seed)


def load_hf_split_checkpoint(
    split_dir: str | os.PathLike[str],
    wrapped_models: Any,
    config: SplitLlamaConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    *,
    is_value_model: bool = False,
) -> SplitLlamaConfig:
    """Load a split model saved by the HF backend (``save_pretrained``) or by :func:`export_hf_split_checkpoint`."""
    config = _split_config(config) if config is not None else SplitLlamaConfig.from_pretrained(os.fspath(split_dir))
    split = TensorReader("hf_split_dir", LazyCheckpoint(split_dir, role="hf_split_dir"))
    adapter: Any = split if config.adapter != "identity" else {}
    sources = SourceMap(split_sources(config, split), adapter, value_head=split)
    load_split_weights(wrapped_models, config, sources, params_dtype, is_value_model=is_value_model)
    return config


__all__ = [
    "ADAPTER_INITS",
    "SourceMap",
    "TensorReader",
    "donor_sources",
    "hf_expected_shapes",
    "initial_adapter_state",
    "load_custom_split_llama_weights",
    "load_hf_split_checkpoint",
    "load_hf_weights_to_custom_split_llama",
    "load_split_weights",
    "split_sources",
    "unwrap_models",
]
