"""Test helpers: random LLaMA donors saved as real (optionally sharded) Hugging Face checkpoints.

Tests and benchmarks build split models from these exactly as a user builds one from Llama-3
checkpoints: same file layout, same loading code. Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from splitllama.configuration_split_llama import llama_config


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


def make_partial_donor(
    path: str | os.PathLike[str],
    config: LlamaConfig,
    layers: list[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A donor checkpoint with the real ``config.json`` but random weights for only ``layers`` (and the
    embeddings, final norm and, if untied, ``lm_head``); one safetensors shard per layer, with an index.

    A split model reads only the layers it uses, so this stands in for a real checkpoint of any size
    (a Llama-3.2-3B or a 70B layout) at the cost of those layers: the config, the layer indices and
    every tensor the split reads have the real names and shapes. Shapes come from transformers'
    own ``LlamaForCausalLM`` built on the meta device (one layer, renumbered). Values are drawn from a
    pool of 2**20 + 7 normal samples (std 0.02) read from a random offset: drawing hundreds of millions
    of samples would take the test's whole time on a CPU, and a layout test needs distinct tensors, not
    independent values.
    """
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    one_layer = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    with torch.device("meta"):
        template = LlamaForCausalLM(one_layer)
    shapes = {name: tuple(p.shape) for name, p in template.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn((1 << 20) + 7, generator=generator) * 0.02).to(dtype)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):  # away from exactly 1, as make_random_donor does
            return (torch.rand(shape, generator=generator) * 0.4 + 0.8).to(dtype)
        numel, offset = math.prod(shape), int(torch.randint(len(pool), (1,), generator=generator))
        return pool.repeat(math.ceil((numel + offset) / len(pool)))[offset : offset + numel].view(shape)

    shards: dict[str, dict[str, torch.Tensor]] = {"model-outer.safetensors": {}}
    for name, shape in shapes.items():
        if ".layers.0." not in name:
            shards["model-outer.safetensors"][name] = tensor(name, shape)
    for index in layers:
        shard = shards.setdefault(f"model-layer-{index:03d}.safetensors", {})
        for name, shape in shapes.items():
            if ".layers.0." in name:
                shard[name.replace(".layers.0.", f".layers.{index}.")] = tensor(name, shape)
    weight_map, total = {}, 0
    for file, tensors in shards.items():
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


def letter_tokenizer(letters: str = "abcdefgh") -> Any:
    """A tokenizer with one token per letter (ids 3, 4, ...) and ``<pad>``, ``<s>``, ``</s>`` as 0, 1, 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(letters)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


__all__ = ["letter_tokenizer", "llama_config", "make_partial_donor", "make_random_donor"]

