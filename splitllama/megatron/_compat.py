"""Import megatron-core once, with an error that says how to get it."""

from __future__ import annotations

from types import ModuleType


def require_megatron() -> ModuleType:
    """Return ``megatron.core``; raise an ``ImportError`` naming the extra to install if it is missing."""
    try:
        import megatron.core as core
    except ImportError as exc:  # pragma: no cover - only where the extra is not installed
        raise ImportError(
            "the megatron backend needs megatron-core (pip install 'splitllama[megatron]'; "
            "megatron-core 0.16 on Python 3.11, 0.19 on Python 3.12)"
        ) from exc
    return core


__all__ = ["require_megatron"]
