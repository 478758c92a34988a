"""Export the megatron split model as an HF split checkpoint (``AutoModelForCausalLM`` loads it).

Each parameter is gathered over the tensor-parallel group, unfused (``linear_qkv`` -> q/k/v per
query group, ``linear_fc1`` -> gate/up per rank) and named as in the HF backend. Under pipeline
parallelism every stage writes its own safetensors shard (``model-0000k-of-0000P.safetensors``,
names with the global split-layer indices) and global rank 0 writes the index, the config with
its remote code, and the small donor's tokenizer, as ``save_pretrained`` does. With several
nodes, ``out_dir`` must be on a shared filesystem.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ...configuration_split_llama import SplitLlamaConfig
from ...weight_map import ADAPTER_PREFIX
from .._compat import require_megatron
from .custom_split_llama_loader import unwrap_models
from .layout import MEGATRON_GLOBAL_PARAMS, PART_MODULES, adapter_split_dim, layer_params

require_megatron()

from megatron.core import parallel_state  # noqa: E402
from ..parallel import communication_device  # noqa: E402

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def _gather_chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This tensor from every tensor-parallel rank, in rank order (on CPU)."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return [tensor.detach().cpu()]
    group = parallel_state.get_tensor_model_parallel_group()
    tensor = tensor.detach().to(communication_device(group)).contiguous()
    chunks = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(chunks, tensor, group=group)
    return [c.cpu() for c in chunks]


def _gathered(tensor: torch.Tensor, split_dim: int | None) -> torch.Tensor:
    if split_dim is None:
        return tensor.detach().cpu()
    return torch.cat(_gather_chunks(tensor), dim=split_dim)


@torch.no_grad()
def gather_hf_state(
    model: Any, config: SplitLlamaConfig, dtype: torch.dtype | None = None, *, use_grad: bool = False
) -> dict[str, torch.Tensor]:
    """The HF split-model tensors held by this pipeline stage, full size (every TP rank must call this).

    ``use_grad`` gathers the parameters' gradients instead, in the same HF layout (for checks
    against the HF backend); parameters without a gradient are left out.
    """
    if use_grad:
        params = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    else:
        params = dict(model.named_parameters())
    layout = model.layout
    state: dict[str, torch.Tensor] = {}
    for part, split_range in (("first", layout.first), ("last", layout.last)):
        donor = config.config_8b if part == "first" else config.config_70b
        head_dim = getattr(donor, "head_dim", None) or donor.hidden_size // donor.num_attention_heads
        per_group = donor.num_attention_heads // donor.num_key_value_heads
        for local, split_index in enumerate(split_range):
            prefix = f"model.layers_{part}.{split_index}."
            for group in layer_params():
                param = params.get(f"{PART_MODULES[part]}.{local}.{group.param}")
                if param is None:
                    continue
                if group.key == "qkv":
                    fused = torch.cat(_gather_chunks(param), dim=0)
                    hidden = fused.shape[1]
                    fused = fused.view(donor.num_key_value_heads, (per_group + 2) * head_dim, hidden)
                    q_rows = per_group * head_dim
                    pieces = {
                        "q": fused[:, :q_rows], "k": fused[:, q_rows : q_rows + head_dim], "v": fused[:, q_rows + head_dim :],
                    }
                    for tensor in group.tensors:
                        state[prefix + tensor.name] = pieces[tensor.shard].reshape(-1, hidden)
                elif group.key == "gate_up":
                    chunks = _gather_chunks(param)
                    for tensor in group.tensors:  # shard 0: gate, 1: up
                        state[prefix + tensor.name] = torch.cat([c.chunk(2, dim=0)[tensor.shard] for c in chunks], dim=0)
                else:
                    (tensor,) = group.tensors
                    state[prefix + tensor.name] = _gathered(param, tensor.split_dim)
    for hf_name, (param_name, split_dim) in MEGATRON_GLOBAL_PARAMS.items():
        if param_name in params:
            state[hf_name] = _gathered(params[param_name], split_dim)
    for name, param in params.items():
        if name.startswith(ADAPTER_PREFIX):
            state[name] = _gathered(param, adapter_split_dim(config, name[len(ADAPTER_PREFIX):]))
    return {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}


def _write_config_and_code(config: SplitLlamaConfig, out: Path, dtype: torch.dtype) -> None:
    from transformers.dynamic_module_utils import custom_object_save

    from ...modeling_split_llama import TOKENIZER_FILES, CustomSplitLLamaForCausalLM

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.use_cache = True
    with torch.device("meta"):
        model = CustomSplitLLamaForCausalLM(config)
    custom_object_save(model, out, config=config)  # what save_pretrained does: remote code + auto_map
    config.save_pretrained(out)
    source = config.path8b
    if source and os.path.isdir(source) and not (out / "tokenizer_config.json").exists():
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), out / name)


def export_hf_split_checkpoint(
    wrapped_models: Any,
    config: SplitLlamaConfig,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model as an HF split checkpoint in ``out_dir``; every rank must call this. Returns ``out_dir``."""
    out = Path(out_dir)
    models = unwrap_models(wrapped_models)
    state: dict[str, torch.Tensor] = {}
    for model in models:
        state.update(gather_hf_state(model, config, dtype))
    first_dtype = next(iter(state.values())).dtype if state else torch.float32
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    writer = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    shard = SINGLE_FILE if pp_size == 1 else f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / shard), metadata={"format": "pt"})
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        if pp_size > 1:
            weight_map: dict[str, str] = {}
            total = 0  # tensor bytes, as save_pretrained counts them
            for stage in range(pp_size):
                name = f"model-{stage + 1:05d}-of-{pp_size:05d}.safetensors"
                with safe_open(str(out / name), framework="pt") as f:
                    for key in f.keys():
                        weight_map[key] = name
                        view = f.get_slice(key)
                        total += math.prod(view.get_shape()) * _DTYPE_BYTES[view.get_dtype()]
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        _write_config_and_code(config, out, first_dtype)
    if dist.is_initialized():
        dist.barrier()
    return out


__all__ = ["export_hf_split_checkpoint", "gather_hf_state"]
