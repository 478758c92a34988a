"""Moved to :mod:`splitllama.run.schema` (the config's typed schema) and :mod:`splitllama.run.settings`
(its checks); this alias keeps old imports working, with a DeprecationWarning."""

from __future__ import annotations

from .._lazy import moved_names

__getattr__ = moved_names(__name__, ["splitllama.run.schema", "splitllama.run.settings", "splitllama.errors"])
