"""Rotary position embeddings of a LLaMA donor, computed here rather than by megatron-core.

megatron-core's ``RotaryEmbedding`` allocates on ``torch.cuda.current_device()``, so it cannot run
on CPU, and it knows nothing of a donor's ``rope_parameters``. This module reads the donor's
``LlamaConfig`` (theta, and Llama-3.1 ``llama3`` or ``linear`` scaling if set) and produces the
rotation angles in the layout megatron's attention applies (``[seq, batch, 1, head_dim]``, the two
halves repeated, non-interleaved: the same rotate-half convention as transformers' LLaMA).

Angles are computed per token from explicit position ids, so packed sequences (positions that
restart at every sequence) and left-padded batches get the right rotation, and every donor gets
its own table: the small and large donors may differ in theta, scaling and head size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: rope types whose rotation is a pure change of frequencies (no attention scaling).
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The donor's rope settings as one dict (transformers 5 keeps them in ``rope_parameters``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def llama_inverse_frequencies(config: Any, field: str = "config") -> torch.Tensor:
    """Inverse frequencies ``(head_dim // 2,)`` in float32 for a LLaMA donor config.

    ``field`` names the config in errors (``config_8b`` / ``config_70b``).
    """
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{field}.rope_parameters.rope_type: {rope_type!r} is not supported by the megatron backend "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(params["rope_theta"])
    # The same expression as the reference implementation, so the float32 values agree bit for bit.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, a smooth band in between."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class LlamaRotaryAngles(nn.Module):
    """Rotation angles of one donor for given positions, in megatron's ``[s, b, 1, d]`` layout."""

    def __init__(self, config: Any, field: str = "config") -> None:
        super().__init__()
        self.register_buffer("inv_freq", llama_inverse_frequencies(config, field), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``position_ids`` ``(batch, seq)`` -> float32 angles ``(seq, batch, 1, head_dim)``."""
        inv_freq = self.inv_freq
        if inv_freq.device != position_ids.device:
            # moved once and kept: a host-to-device copy from pageable memory synchronises the stream,
            # so copying at every forward would stall the CPU's launches behind the GPU
            inv_freq = self.inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (b, s, d/2), one product per entry
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.transpose(0, 1).unsqueeze(2)

    def reset(self, config: Any, field: str = "config") -> None:
        """Recompute the (non-persistent) table, e.g. after the module was built on the meta device."""
        self.inv_freq = llama_inverse_frequencies(config, field).to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")


__all__ = ["LlamaRotaryAngles", "SUPPORTED_ROPE_TYPES", "llama_inverse_frequencies", "rope_parameters"]
