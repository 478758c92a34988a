"""Gradient collectives of the megatron backend: finish, clip and broadcast what the schedule computed.

Sequence-parallel partial gradients are summed over TP, data-parallel gradients averaged over
the DP group (coalesced into buckets), the gradient norm taken over all model-parallel shards
(replicated tensors counted once), and trainable parameters broadcast within the DP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._compat import require_megatron

require_megatron()

from megatron.core import parallel_state  # noqa: E402


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradient is partial per rank under sequence parallelism (norms, biases)."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def _allreduce_coalesced(tensors: Sequence[torch.Tensor], group: Any, scale: float = 1.0, bucket_bytes: int = 256 << 20) -> None:
    """All-reduce (sum) ``tensors`` in place over ``group`` in flat buckets of one dtype, then multiply by ``scale``."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in [*same, None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                if scale != 1.0:
                    flat.mul_(scale)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum the partial gradients of sequence-parallel replicated parameters over the TP group."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    _allreduce_coalesced(grads, parallel_state.get_tensor_model_parallel_group())


def allreduce_data_parallel_grads(model: nn.Module) -> None:
    """Average the gradients of trainable parameters over the data-parallel group (what DDP does)."""
    world = parallel_state.get_data_parallel_world_size()
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    _allreduce_coalesced(grads, parallel_state.get_data_parallel_group(), scale=1.0 / world)


def broadcast_trainable_params(model: nn.Module) -> None:
    """Make the trainable parameters of every data-parallel replica equal to DP rank 0's (DDP does this at wrap time)."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return
    group = parallel_state.get_data_parallel_group()
    src = dist.get_global_rank(group, 0)
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=src, group=group)


def model_parallel_grad_norm(parameters: Sequence[nn.Parameter], device: torch.device | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients over the model-parallel (TP x PP) group, each element counted once.

    Every model-parallel rank must call it (a collective), also one without gradients; ``device``
    is where such a rank puts its zero (the communication device).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total: torch.Tensor | None = None
    for p in parameters:
        if p.grad is None:
            continue
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue  # replicated over TP: rank 0 counts it
        sq = p.grad.detach().float().pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        device = device or next((p.device for p in parameters), torch.device("cpu"))
        total = torch.zeros((), device=device)
    if parallel_state.get_model_parallel_group() is not None and dist.get_world_size(parallel_state.get_model_parallel_group()) > 1:
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


def clip_grad_norm_model_parallel(
    parameters: Sequence[nn.Parameter], max_norm: float, device: torch.device | None = None
) -> torch.Tensor:
    """``clip_grad_norm_`` with the norm taken over the whole model, not this rank's shards."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = model_parallel_grad_norm(parameters, device)
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in parameters:
            p.grad.mul_(coef)
    return norm

__all__ = [
    "allreduce_data_parallel_grads",
    "allreduce_sequence_parallel_grads",
    "broadcast_trainable_params",
    "clip_grad_norm_model_parallel",
    "model_parallel_grad_norm",
    "sequence_parallel_params",
]
