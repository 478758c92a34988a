"""Shared fixtures: tiny random LLaMA donors saved as real sharded safetensors checkpoints.

The shapes keep Llama-3's relations at toy size: GQA, and the same head_dim and KV-head count in
both donors (the large one wider and deeper). ``odd_donor`` breaks that relation on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from splitllama.testing import llama_config, make_random_donor  # noqa: E402

VOCAB = 256
SMALL = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)
LARGE = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def donor_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("donors")


@pytest.fixture(scope="session")
def small_donor(donor_root: Path) -> Path:
    """Small donor (hidden 64, 6 layers), sharded into several safetensors files."""
    return make_random_donor(donor_root / "small", llama_config(**SMALL), seed=1, max_shard_size="150KB")


@pytest.fixture(scope="session")
def large_donor(donor_root: Path) -> Path:
    """Large donor (hidden 128, 8 layers), sharded."""
    return make_random_donor(donor_root / "large", llama_config(**LARGE), seed=2, max_shard_size="300KB")


@pytest.fixture(scope="session")
def tied_large_donor(donor_root: Path) -> Path:
    """Large donor with tied embeddings (no lm_head.weight), like Llama-3.2-1B/3B; one file."""
    return make_random_donor(donor_root / "large_tied", llama_config(**LARGE, tie_word_embeddings=True), seed=3)


@pytest.fixture(scope="session")
def odd_donor(donor_root: Path) -> Path:
    """A donor whose head_dim and KV heads differ from the others (hidden 96, 4 heads of 24, 4 KV heads)."""
    cfg = llama_config(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=24, vocab_size=VOCAB)
    return make_random_donor(donor_root / "odd", cfg, seed=4)
