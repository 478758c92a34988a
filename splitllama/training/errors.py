"""Moved to :mod:`splitllama.errors` (the ground floor); this alias keeps old imports working."""

from __future__ import annotations

from ..errors import RunConfigError

__all__ = ["RunConfigError"]
