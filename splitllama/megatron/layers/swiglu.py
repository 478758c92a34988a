"""SwiGLU over megatron's fused ``linear_fc1`` output, without megatron's slow paths on GPUs.

megatron-core computes the LLaMA MLP's ``silu(gate) * up`` from one ``[s, b, 2 x ffn]`` tensor
(gate half first). Its unfused path splits that tensor into two strided halves, so SiLU, the
product and their gradients run PyTorch's non-vectorised kernels and the backward concatenates
the two gradient halves: on an H200 (4096 tokens, bf16) 1.01 ms at the 8B FFN width where the HF
model's separate gate/up tensors take 0.57 ms, which made the whole megatron backend 1-2.5% slower
than the HF one. Its ``bias_activation_fusion`` path is ``torch.compile``d with automatic dynamic
shapes: once the second donor's FFN width appears it recompiles with a symbolic width, and at the
70B width takes 2.68 ms (the eager path 2.00). ``benchmarks/swiglu.py`` measures all of these.

:class:`SwiGLU` is the activation module of our layer spec (megatron calls such a module on the
whole fc1 output when ``use_te_activation_func`` is set; nothing of TransformerEngine is used).
On CUDA it runs one compiled kernel each way, specialised to the tensor's shape (0.48 ms at the
8B width, 0.88 at the 70B one); on other devices, and if compiling fails, the eager ops. Shapes
are fixed in training (packed blocks of ``seq_len``), so few compilations happen; past torch's
recompile limit (many distinct token counts, e.g. variable-length packed inputs) torch falls back
to eager by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension (eager)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def swiglu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_reference` with respect to ``x``, given the output gradient ``grad``."""
    gate, up = torch.chunk(x, 2, dim=-1)
    sig = torch.sigmoid(gate)
    return torch.cat((grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig), dim=-1)


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def _kernel(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled once per process for static shapes (``dynamic=False``: no symbolic FFN width)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


class _CompiledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _kernel("forward", swiglu_reference)(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _kernel("backward", swiglu_grad)(grad.contiguous(), x)


class SwiGLU(nn.Module):
    """The MLP activation of the megatron layer spec: ``[..., 2 x ffn] -> [..., ffn]``."""

    compile_failed = False  # class-wide: one failed compilation switches every instance to eager

    def __init__(self, config: Any = None, **unused: Any) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or SwiGLU.compile_failed:
            return swiglu_reference(x)
        try:
            return _CompiledSwiGLU.apply(x)
        except Exception as exc:  # noqa: BLE001 - no compiler or triton on this machine: stay correct
            SwiGLU.compile_failed = True
            logger.warning("SwiGLU: torch.compile failed (%s); using the eager ops", exc)
            return swiglu_reference(x)


__all__ = ["SwiGLU", "swiglu_grad", "swiglu_reference"]
