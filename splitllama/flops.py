"""Training FLOPs per token of a split model and of its donors, counted one way for every report.

The cost axis of every comparison (the run's last line, the sweep's Pareto front, the stitching
curve) comes from here, so a split and its donors are always counted alike:
``6 * matmul parameters + 6 * seq * attention width`` per layer.
"""

from __future__ import annotations

import math
from typing import Any


def count_flops_per_token(config: Any, seq_len: int, *, teacher: bool = False) -> dict[str, float]:
    """Training FLOPs per token of the split model: ``6 * matmul parameters + 6 * seq * width`` per layer.

    Matmul parameters include the LM head and the adapter, not the embeddings; the attention
    term uses each layer's own attention width (heads x head_dim). Forward alone is a third.
    ``teacher``: the objective distils from the large donor (``objective=distill`` or ``mixed``), whose
    forward pass (a third of its training FLOPs) runs on every training token: it is part of what
    training the split costs, so it is in ``train_flops_per_token`` and ``fraction_of_large_donor``
    (``teacher_flops_per_token`` on its own); inference costs ``forward_flops_per_token`` either way.
    """
    small, large = config.config_8b, config.config_70b
    layer_params = layer_matmul_params
    adapter = sum(math.prod(shape) for name, shape in config.adapter_shapes.items() if name.endswith("weight"))
    matmul = (
        config.num_layers_8 * layer_params(small) + config.num_layers_70 * layer_params(large)
        + adapter + large.hidden_size * config.vocab_size
    )
    attention = seq_len * (
        config.num_layers_8 * small.num_attention_heads * small.head_dim
        + config.num_layers_70 * large.num_attention_heads * large.head_dim
    )
    split_train = 6.0 * matmul + 6.0 * attention
    large_donor = 6.0 * (large.num_hidden_layers * layer_params(large) + large.hidden_size * config.vocab_size) + 6.0 * seq_len * (
        large.num_hidden_layers * large.num_attention_heads * large.head_dim)
    teacher_forward = large_donor / 3 if teacher else 0.0
    train = split_train + teacher_forward
    return {"train_flops_per_token": train, "forward_flops_per_token": split_train / 3, "matmul_parameters": float(matmul),
            "teacher_flops_per_token": teacher_forward,
            # the cost the split is for: its FLOPs per token against the whole large donor's, counted the same way
            "large_donor_train_flops_per_token": large_donor, "fraction_of_large_donor": train / large_donor}


def layer_matmul_params(c: Any) -> int:
    """Matmul parameters of one LLaMA decoder layer (q, k, v, o and the SwiGLU MLP)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return attn + 3 * c.hidden_size * c.intermediate_size


__all__ = ["count_flops_per_token", "layer_matmul_params"]
