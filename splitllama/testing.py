"""Random LLaMA donors saved as real (optionally sharded) Hugging Face checkpoints.

Tests and benchmarks build split models from these exactly as a user builds one from Llama-3
checkpoints: same file layout, same loading code. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    max_position_embeddings: int = 512,
    rope_theta: float = 500000.0,
    tie_word_embeddings: bool = False,
    rms_norm_eps: float = 1e-5,
) -> LlamaConfig:
    """A Llama-3-like config at toy size (GQA, RoPE theta 500000, RMSNorm eps 1e-5)."""
    return LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_attention_heads,
        intermediate_size=intermediate_size if intermediate_size is not None else int(hidden_size * 3.5) // 8 * 8,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_random_donor(
    path: str | os.PathLike[str],
    config: LlamaConfig | None = None,
    *,
    seed: int = 0,
    max_shard_size: str | int = "50MB",
    dtype: torch.dtype = torch.float32,
    **config_kwargs: object,
) -> Path:
    """Create, randomly initialise and save a LLaMA donor; returns its directory.

    Weights are drawn with std 0.02 (norm weights near 1) and saved as safetensors, sharded
    when larger than ``max_shard_size`` (pass a small size to force several shards).
    """
    path = Path(path)
    config = config if config is not None else llama_config(**config_kwargs)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms away from exactly 1 so that a wrong norm is visible in tests
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


__all__ = ["llama_config", "make_random_donor"]
