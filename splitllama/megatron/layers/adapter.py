"""The tensor-parallel adapter from the small donor's hidden size to the large donor's.

Parameter names follow the HF backend (``adapter_linear_1``, ``adapter_linear_2``) so the same
adapter checkpoint loads into either backend. Layouts, chosen so that no output gather is needed
(the result is already the full, replicated ``h_l`` hidden state the next block expects):

* ``linear``: one ``RowParallelLinear`` (h_s -> h_l) with ``input_is_parallel=False``: each rank
  multiplies its slice of the input features and the partial products are summed (all-reduce).
* ``mlp``: ``ColumnParallelLinear`` (h_s -> inner, each rank a slice of the inner units) -> ReLU
  (element-wise, so it applies to the slices) -> ``RowParallelLinear`` (inner -> h_l).
* ``lowrank``: the same without the ReLU, through ``adapter_rank`` (no bias on the first map).
* ``identity``: no parameters (equal hidden sizes).

Under sequence parallelism the input arrives split along the sequence; the column-parallel first
maps gather it as usual, and the single row-parallel map of ``linear`` gets its input by an
all-to-all (sequence-split -> feature-split) and reduce-scatters its output back to sequence-split.
"""

from __future__ import annotations

import torch
from torch import nn

from .._compat import require_megatron

require_megatron()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.tensor_parallel.mappings import all_to_all_sp2hp  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


def _init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(weight, mean=0.0, std=std)

    return init


class ParallelSplitAdapter(nn.Module):
    """Small -> large hidden-state map, tensor parallel; ``config`` is the large donor's ``TransformerConfig``."""

    def __init__(
        self,
        kind: str,
        hidden_size_small: int,
        hidden_size_large: int,
        config: TransformerConfig,
        *,
        inner_size: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.sequence_parallel = bool(config.sequence_parallel)
        tp = config.tensor_model_parallel_size
        init = _init(config.init_method_std)
        group = parallel_state.get_tensor_model_parallel_group()
        if kind == "identity":
            if hidden_size_small != hidden_size_large:
                raise ValueError(f"adapter: identity needs equal hidden sizes, got {hidden_size_small} and {hidden_size_large}")
            return
        if kind == "linear":
            if hidden_size_small % tp:
                raise ValueError(f"adapter: the small hidden size {hidden_size_small} is not divisible by tensor parallel size {tp}")
            self.adapter_linear_1 = tensor_parallel.RowParallelLinear(
                hidden_size_small, hidden_size_large, config=config, init_method=init, bias=bias,
                input_is_parallel=self.sequence_parallel, skip_bias_add=False, tp_group=group,
            )
            return
        if kind not in ("mlp", "lowrank"):
            raise ValueError(f"adapter: unknown adapter {kind!r} (linear, mlp, lowrank, identity)")
        field = "adapter_hidden_size" if kind == "mlp" else "adapter_rank"
        if inner_size is None or inner_size % tp:
            raise ValueError(f"{field}: {inner_size} must be divisible by tensor parallel size {tp} for the megatron backend")
        self.adapter_linear_1 = tensor_parallel.ColumnParallelLinear(
            hidden_size_small, inner_size, config=config, init_method=init, bias=bias and kind == "mlp", gather_output=False,
            tp_group=group,
        )
        self.act = nn.ReLU() if kind == "mlp" else nn.Identity()
        self.adapter_linear_2 = tensor_parallel.RowParallelLinear(
            inner_size, hidden_size_large, config=config, init_method=init, bias=bias, input_is_parallel=True,
            skip_bias_add=False, tp_group=group,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h_s]`` (or ``[s/tp, b, h_s]`` under sequence parallelism) -> same layout with ``h_l``."""
        if self.kind == "identity":
            return hidden_states
        if self.kind == "linear":
            if self.sequence_parallel:  # [s/tp, b, h_s] -> [s, b, h_s/tp]
                batch = hidden_states.shape[1]
                hidden_states = all_to_all_sp2hp(hidden_states)
                hidden_states = hidden_states.view(-1, batch, hidden_states.shape[-1])
            out, _ = self.adapter_linear_1(hidden_states)
            return out
        hidden_states, _ = self.adapter_linear_1(hidden_states)
        hidden_states = self.act(hidden_states)
        out, _ = self.adapter_linear_2(hidden_states)
        return out


__all__ = ["ParallelSplitAdapter"]
