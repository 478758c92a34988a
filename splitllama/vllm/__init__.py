"""vLLM backend of the split model: serving, generation and scoring.

``import splitllama.vllm`` does not import vLLM; the functions below do, when called.

- :func:`generate` / :func:`score` / :func:`token_logprobs`: sample from or score a saved split
  model (or any model directory vLLM can load) with vLLM's engine.
- :func:`load_llm`: start one engine and pass it to the functions above to reuse it.
- The ``vllm.general_plugins`` entry point (:func:`splitllama.vllm.plugin.register`) makes
  ``vllm serve <split model dir>`` work; the model itself is :mod:`splitllama.vllm.model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

_LAZY = {
    "Generation": "inference",
    "generate": "inference",
    "load_llm": "inference",
    "score": "inference",
    "shutdown": "inference",
    "token_logprobs": "inference",
    "register": "plugin",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


if TYPE_CHECKING:
    from .inference import Generation, generate, load_llm, score, shutdown, token_logprobs
    from .plugin import register

__all__ = sorted(_LAZY)
