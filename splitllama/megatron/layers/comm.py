"""A device-agnostic gather of vocabulary-parallel logits.

megatron-core's ``gather_from_tensor_model_parallel_region`` allocates its output with
``torch.cuda.current_device()``, so it fails on CPU; this one allocates where its input lives.
Forward: all-gather along the last dimension; backward: this rank's slice of the gradient (the
gathered tensor is used identically on every rank, as in megatron's version).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._compat import require_megatron

require_megatron()

from megatron.core import parallel_state  # noqa: E402


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        world = dist.get_world_size(group)
        ctx.rank, ctx.world = dist.get_rank(group), world
        tensor = tensor.contiguous()
        chunks = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(chunks, tensor, group=group)
        return torch.cat(chunks, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.chunk(ctx.world, dim=-1)[ctx.rank].contiguous()


def gather_last_dim_from_tensor_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor-parallel ranks' last-dimension slices (identity at TP=1)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    return _GatherLastDim.apply(tensor)


__all__ = ["gather_last_dim_from_tensor_parallel"]
