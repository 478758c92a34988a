"""The one dtype resolver: a config's dtype name (``float32``, ``bf16``, ``torch.float16``...) to a ``torch.dtype``."""

from __future__ import annotations

from collections.abc import Collection

import torch

_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(dtype: torch.dtype | str, field: str = "dtype", allowed: Collection[torch.dtype] | None = None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``; an unknown name (or one outside ``allowed``) fails naming ``field``."""
    if isinstance(dtype, torch.dtype):
        value: object = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        value = getattr(torch, _ALIASES.get(name, name), None)
    if not isinstance(value, torch.dtype) or (allowed is not None and value not in allowed):
        raise ValueError(f"{field}: unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


__all__ = ["resolve_dtype"]
