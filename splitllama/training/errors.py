"""The error of a bad run configuration, and the check that raises it naming the override."""

from __future__ import annotations

from typing import Any


class RunConfigError(ValueError):
    """A run configuration value is invalid; the message starts with the override that fixes it."""


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise RunConfigError(f"{key}={value}: {rule}")


__all__ = ["RunConfigError"]
