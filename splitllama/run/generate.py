"""Completing prompts with a saved split model: vLLM (``task.engine=vllm``) or transformers (``hf``)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from ..errors import RunConfigError

logger = logging.getLogger("splitllama.run")


def generate_texts(cfg: DictConfig, model_dir: str, record: Any) -> dict[str, str]:
    """``task.prompts`` completed by ``task.engine`` from ``model_dir``; ``{prompt: completion}``, also in the record."""
    prompts, n, temp = list(cfg.task.prompts), cfg.task.max_new_tokens, cfg.task.temperature
    with record.timed("generate"):
        if cfg.task.engine == "vllm":
            from ..vllm import generate as vllm_generate

            texts = [g.text for g in vllm_generate(model_dir, prompts, max_new_tokens=n, temperature=temp, seed=cfg.seed)]
        elif cfg.task.engine == "hf":
            texts = hf_generate(model_dir, prompts, n, temp, cfg.seed)
        else:
            raise RunConfigError(f"task.engine={cfg.task.engine}: must be vllm or hf (task.engine=hf runs anywhere)")
    generations = dict(zip(prompts, texts))
    record.update("generations", generations)
    for prompt, text in generations.items():
        logger.info("%r -> %r", prompt, text)
    return generations


def hf_generate(model_dir: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """Each prompt completed by transformers' ``generate`` (greedy at temperature 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splitllama  # noqa: F401  (registers the split model with the Auto classes)

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


__all__ = ["generate_texts", "hf_generate"]
