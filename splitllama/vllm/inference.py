"""Generate and score with vLLM: the functions ``run.py`` tasks and notebooks call.

Each function takes either a model directory (a saved split model, or any model vLLM loads) or an
engine made by :func:`load_llm`. Given a directory, it starts an engine, uses it and shuts it
down; to run several calls on one engine (an engine start costs tens of seconds), make one with
:func:`load_llm` and pass it, then :func:`shutdown` it.

Prompts are texts (tokenised by the tokenizer saved with the model, special tokens included as
vLLM does) or lists of token ids (used as given; the only choice for a model saved without a
tokenizer).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..configuration_split_llama import SplitLlamaConfig
from ..modeling_split_llama import TOKENIZER_FILES

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]

#: KV-cache memory reserved on CPU when the caller names neither ``kv_cache_memory_bytes`` nor
#: ``gpu_memory_utilization``: vLLM's CPU default reserves 90% of the machine's memory.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class Generation:
    """One completion of one prompt."""

    prompt: str | list[int]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  #: ``None`` when the model has no tokenizer
    finish_reason: str | None  #: ``length`` or ``stop``
    cumulative_logprob: float | None


def has_tokenizer(model_dir: str | os.PathLike[str]) -> bool:
    """Whether a tokenizer was saved with the model (``tokenizer.json`` / ``tokenizer_config.json``...)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES[:4])


def _check_model_dir(model_dir: str | os.PathLike[str]) -> None:
    """Fail in the caller's process, naming the file, before an engine starts."""
    path = Path(model_dir)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir: {path} is not a directory (expected a saved split model or HF model)")
    if not config_file.is_file():
        raise FileNotFoundError(f"model_dir: no config.json in {path}")
    from ..checkpoint import INDEX_FILE, check_model_dir

    # config, tokenizer and generation files parse; safetensors weights whole (headers against sizes): the engine's
    # workers would otherwise fail far from the file
    has_weights = (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))
    check_model_dir(path, f"model_dir={path}", model_types=None, weights=has_weights,
                    fix="Save or export the model again, or give another model_dir")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == SplitLlamaConfig.model_type:
        from .loading import check_split_checkpoint, check_vllm_compatible

        split = SplitLlamaConfig.from_pretrained(path)
        check_vllm_compatible(split)
        check_split_checkpoint(split, path)


def load_llm(
    model_dir: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    max_model_len: int | None = None,
    seed: int = 0,
    enforce_eager: bool = False,
    skip_tokenizer_init: bool | None = None,
    **engine_kwargs: Any,
) -> LLM:
    """Start a vLLM engine on ``model_dir`` (keyword arguments go to ``vllm.LLM``).

    The split model is found through the plugin (registered here too, for source checkouts).
    Without a saved tokenizer the engine skips tokenizer initialisation and takes token ids only.
    On CPU, the KV cache gets :data:`DEFAULT_CPU_KV_CACHE_BYTES` unless ``kv_cache_memory_bytes``
    or ``gpu_memory_utilization`` is given.
    """
    _check_model_dir(model_dir)
    from vllm import LLM
    from vllm.platforms import current_platform

    from .plugin import register

    register()
    if skip_tokenizer_init is None:
        skip_tokenizer_init = not has_tokenizer(model_dir)
    if current_platform.is_cpu() and not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & engine_kwargs.keys():
        engine_kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    return LLM(
        model=os.fspath(model_dir),
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        skip_tokenizer_init=skip_tokenizer_init,
        **engine_kwargs,
    )


def shutdown(llm: LLM) -> None:
    """Stop an engine made by :func:`load_llm` and free what it holds (another may start after)."""
    from vllm.distributed import cleanup_dist_env_and_memory

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _engine(model: Any, engine_kwargs: dict[str, Any]) -> Iterator[LLM]:
    if isinstance(model, (str, os.PathLike)):
        llm = load_llm(model, **engine_kwargs)
        try:
            yield llm
        finally:
            shutdown(llm)
        return
    if engine_kwargs:
        raise TypeError(f"engine arguments {sorted(engine_kwargs)} given with an engine that is already running")
    yield model


def _prompt_inputs(prompts: Sequence[Prompt], tokenizer: bool) -> list[Any]:
    """vLLM inputs for ``prompts``: texts as they are, token-id lists as ``{"prompt_token_ids": ...}``."""
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of prompts, got one string")
    inputs: list[Any] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not tokenizer:
                raise ValueError(
                    f"prompts[{i}]: a text prompt needs a tokenizer, but the model has none; "
                    "pass token-id lists or save a tokenizer with the model"
                )
            inputs.append(prompt)
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompts[{i}]: empty prompt")
            inputs.append({"prompt_token_ids": ids})
    return inputs


def _engine_inputs(model: Any, prompts: Sequence[Prompt], engine_kwargs: dict[str, Any]) -> list[Any]:
    """Check prompts against the model before an engine starts (a directory) or against the engine."""
    if isinstance(model, (str, os.PathLike)):
        _check_model_dir(model)
        skip = engine_kwargs.get("skip_tokenizer_init")
        return _prompt_inputs(prompts, has_tokenizer(model) if skip is None else not skip)
    return _prompt_inputs(prompts, not model.llm_engine.model_config.skip_tokenizer_init)


def generate(
    model: str | os.PathLike[str] | LLM,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    *,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    seed: int | None = None,
    ignore_eos: bool = False,
    stop: Sequence[str] | None = None,
    **engine_kwargs: Any,
) -> list[Generation] | list[list[Generation]]:
    """Complete each prompt; greedy at ``temperature=0``.

    Returns one :class:`Generation` per prompt (a list of ``n`` per prompt when ``n > 1``), in
    prompt order. ``engine_kwargs`` go to :func:`load_llm` when ``model`` is a directory.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    inputs = _engine_inputs(model, prompts, engine_kwargs)
    from vllm import SamplingParams

    with _engine(model, engine_kwargs) as llm:
        params = SamplingParams(
            n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            ignore_eos=ignore_eos, stop=list(stop) if stop else None,
            detokenize=not llm.llm_engine.model_config.skip_tokenizer_init,
        )
        outputs = llm.generate(inputs, params, use_tqdm=False)
        results = [
            [
                Generation(
                    prompt=prompt if isinstance(prompt, str) else list(prompt),
                    prompt_token_ids=list(out.prompt_token_ids or []),
                    token_ids=list(c.token_ids),
                    text=c.text if params.detokenize else None,
                    finish_reason=c.finish_reason,
                    cumulative_logprob=c.cumulative_logprob,
                )
                for c in out.outputs
            ]
            for prompt, out in zip(prompts, outputs, strict=True)
        ]
    return [r[0] for r in results] if n == 1 else results


def token_logprobs(
    model: str | os.PathLike[str] | LLM, texts: Sequence[Prompt], **engine_kwargs: Any
) -> list[list[float]]:
    """Log-probability of each token of each text given the tokens before it.

    A text of ``T`` tokens gives ``T - 1`` values: the first token is context only.
    """
    inputs = _engine_inputs(model, texts, engine_kwargs)
    from vllm import SamplingParams

    with _engine(model, engine_kwargs) as llm:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = llm.generate(inputs, params, use_tqdm=False)
        scores: list[list[float]] = []
        for out in outputs:
            ids = list(out.prompt_token_ids or [])
            per_position = out.prompt_logprobs or []
            values = []
            for position, token in enumerate(ids[1:], start=1):
                entry = per_position[position]
                if entry is None or token not in entry:
                    raise RuntimeError(f"vLLM returned no log-prob for prompt token {position} (id {token})")
                values.append(float(entry[token].logprob))
            scores.append(values)
    return scores


def score(model: str | os.PathLike[str] | LLM, texts: Sequence[Prompt], **engine_kwargs: Any) -> list[float]:
    """Log-likelihood of each text (sum of :func:`token_logprobs`; the first token is context)."""
    return [sum(values) for values in token_logprobs(model, texts, **engine_kwargs)]


__all__ = [
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "Generation",
    "generate",
    "has_tokenizer",
    "load_llm",
    "score",
    "shutdown",
    "token_logprobs",
]
