"""Moved to :mod:`splitllama.backend.sharding` (FSDP2 sharding of the HF backend); this alias keeps old imports and ``_target_`` paths working."""

from __future__ import annotations

from .._lazy import moved_names

__getattr__ = moved_names(__name__, "splitllama.backend.sharding")
