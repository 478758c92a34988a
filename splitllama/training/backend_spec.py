"""Moved to :mod:`splitllama.backend.spec` (the backend object); this alias keeps old imports and ``_target_`` paths working."""

from __future__ import annotations

from .._lazy import moved_names

__getattr__ = moved_names(__name__, "splitllama.backend.spec")
