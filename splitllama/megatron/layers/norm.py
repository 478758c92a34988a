"""RMSNorm with the LLaMA donors' numerics, usable with sequence parallelism.

megatron-core's local norm (``WrappedTorchNorm``) refuses sequence parallelism, and its fused
norms need TransformerEngine or Apex. This one normalises in float32 and multiplies by the weight
after casting back, as transformers' ``LlamaRMSNorm`` does, so the backend reproduces the HF model
(on the GPU: torch's fused ``rms_norm``, the same in float32, see ``forward``).
Under sequence parallelism each rank sees a slice of the tokens, so the weight's gradient is a
partial sum: the weight is tagged ``sequence_parallel`` (megatron's convention) and the gradient
is summed over the tensor-parallel group before the optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LlamaRMSNormTP(nn.Module):
    """``weight * (x / rms(x))`` computed in float32; built by megatron specs as ``(config, hidden_size, eps)``."""

    def __init__(self, config: Any = None, hidden_size: int = 0, eps: float = 1e-5, **unused: Any) -> None:
        super().__init__()
        dtype = getattr(config, "params_dtype", None) or torch.float32
        # on the GPU where megatron puts its own parameters (use_cpu_initialization=False), else on the CPU
        on_gpu = torch.cuda.is_available() and not getattr(config, "use_cpu_initialization", True)
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda:
            # one fused kernel each way (float32 inside) instead of six elementwise passes over the
            # activations: under tensor parallelism without SP every rank normalises every token, so
            # this cost does not shrink with TP. In bfloat16 it rounds weight * normalised once
            # rather than twice (<= 1 bf16 ulp from transformers); in float32 it is the same product.
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.eps)
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


__all__ = ["LlamaRMSNormTP"]
