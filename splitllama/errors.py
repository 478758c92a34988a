"""The error of a bad run configuration, and the check that raises it naming the override.

Ground floor: every layer that refuses a setting (the data layer, the backends, the harness,
the run's steps) raises :class:`RunConfigError` from here, so ``run.py`` turns each into one
``error: <override>: <rule>`` line.
"""

from __future__ import annotations

from typing import Any


class RunConfigError(ValueError):
    """A run configuration value is invalid; the message starts with the override that fixes it."""


def check_setting(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise :class:`RunConfigError` ``"<key>=<value>: <rule>"`` unless ``ok``."""
    if not ok:
        raise RunConfigError(f"{key}={value}: {rule}")


__all__ = ["RunConfigError", "check_setting"]
