"""Moved to :mod:`splitllama.run` (the run's steps, one module each); this alias keeps old imports
and ``_target_`` paths (``splitllama.training.pipeline.text_datamodule``) working, with a DeprecationWarning."""

from __future__ import annotations

from .._lazy import moved_names

__getattr__ = moved_names(__name__, [f"splitllama.run.{step}" for step in (
    "settings", "checks", "donors", "data", "model", "trainer", "resume", "export", "downstream", "setup")])
