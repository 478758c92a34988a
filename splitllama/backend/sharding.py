"""Sharded data parallelism for the HF backend: FSDP2 applied around the model, torchtitan style.

``parallel=fsdp`` shards the transformers split model over the data-parallel processes with
torch's per-parameter FSDP (``torch.distributed.fsdp.fully_shard``): each decoder layer (of both
donors) is one unit that is all-gathered just before it runs and freed after, and the root unit
holds what is left (embeddings, adapter, final norm, head). The model definition knows nothing of
this: :func:`apply_fsdp` is called on the built model once the processes and their device mesh
exist (``SplitLlamaLitModule.configure_model`` under :class:`ShardedStrategy`).

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens a unit's parameters into
one flat tensor, so a model built before the strategy wraps it (ours is assembled from the donors
first, to fail fast on bad donors) ends up half wrapped (``'weight' must be 2-D`` at the embedding),
and frozen and trainable tensors must share flat parameters. FSDP2 shards every parameter on its
own (a ``DTensor``), so frozen donor layers and a trainable adapter mix freely, any ``finetune=``
works unchanged, and a state dict keeps the model's own parameter names.

Mixed precision (``parallel.fsdp_param_dtype=bfloat16``): parameters are all-gathered and
computed in bf16 while the sharded master weights and the optimizer stay in float32 and gradients
are reduce-scattered in float32 (FSDP2's ``MixedPrecisionPolicy``).

Checkpoints (:class:`ShardedStrategy`): each rank writes its own shard of the trainable tensors
and optimizer state (torch distributed checkpoint, a directory ``last.ckpt/``); resuming reads
back exactly those tensors. The export gathers the full state dict (a collective) and rank 0
writes one ordinary HF split checkpoint (:func:`full_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RunConfigError

#: ``parallel.fsdp_sharding_strategy`` values: FULL_SHARD frees a unit's gathered weights after its
#: forward (re-gathered for the backward; least memory), SHARD_GRAD_OP keeps them until the backward.
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def decoder_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The decoder layers of both donors, in order (found by type, so peft-wrapped models work too)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return (m for m in model.modules() if isinstance(m, LlamaDecoderLayer))


def apply_fsdp(
    model: nn.Module,
    mesh: Any,
    *,
    param_dtype: str | None = None,
    sharding_strategy: str = "FULL_SHARD",
    wrap_decoder_layers: bool = True,
) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (a 1-D data-parallel ``DeviceMesh``); returns it.

    ``param_dtype``: ``None`` (compute in the parameters' dtype) or ``bfloat16``/``float16``
    (gather and compute in that dtype, reduce gradients in float32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if sharding_strategy not in RESHARD_AFTER_FORWARD:
        raise ValueError(
            f"parallel.fsdp_sharding_strategy={sharding_strategy}: must be one of {sorted(RESHARD_AFTER_FORWARD)}"
        )
    reshard = RESHARD_AFTER_FORWARD[sharding_strategy]
    policy = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype) if param_dtype else None,
        reduce_dtype=torch.float32 if param_dtype else None,
    )
    if wrap_decoder_layers:
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # the root unit: embeddings, adapter, norm and head; kept gathered after the forward (the
    # backward starts with the head straight away)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True once :func:`apply_fsdp` (or any FSDP2 call) has sharded ``model``."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _sharded_checkpoint_keys(path: Path) -> set[str]:
    """Names stored in a torch distributed checkpoint directory (read from its metadata, no tensor data)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _strategy_base() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class ShardedStrategy(_strategy_base()):  # type: ignore[misc]
    """``ModelParallelStrategy`` for ``parallel=fsdp``: data parallel over every process, tensor parallel 1.

    Lightning's sharded-checkpoint loader asks the checkpoint for every tensor of the model, but
    ours hold only the trainable ones (the frozen donor weights are read from the donors again),
    so loading reads exactly the tensors a checkpoint has, and refuses one that lacks a trainable
    tensor of this run.
    """

    strategy_name = "splitllama_fsdp"

    def __init__(self, timeout_s: float | None = None, **kwargs: Any) -> None:
        from datetime import timedelta

        kwargs.setdefault("tensor_parallel_size", 1)
        kwargs.setdefault("data_parallel_size", "auto")
        if timeout_s:
            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        stored = _sharded_checkpoint_keys(path)
        module = self.model
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        wanted = {f"state_dict.{name}" for name in trainable}
        missing = sorted(wanted - stored)
        if missing:
            raise RunConfigError(
                f"ckpt_path: {path} lacks {len(missing)} trainable tensor(s) of this run ({missing[:5]}): it was made with "
                "other finetune / adapter settings; resume with the settings it was trained with (its run directory's "
                ".hydra/config.yaml), or start a new run without ckpt_path"
            )
        model_state = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
        state: dict[str, Any] = {"state_dict": model_state}
        for idx, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{idx}"] = get_optimizer_state_dict(module, optimizer)
        dcp_load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[f"optimizer_{idx}"])
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        metadata["state_dict"] = model_state  # what on_load_checkpoint checks (already loaded in place)
        return metadata


__all__ = [
    "RESHARD_AFTER_FORWARD",
    "ShardedStrategy",
    "apply_fsdp",
    "decoder_layers",
    "full_state_dict",
    "is_sharded",
]
