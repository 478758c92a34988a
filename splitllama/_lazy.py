"""Lazy package attributes (PEP 562), so ``import splitllama`` stays light.

Importing the package must not import vLLM, megatron-core or even the assembly code: vLLM's
plugin loader imports ``splitllama`` in every worker process, and a CPU-only install has no
megatron-core. Each package lists ``{attribute: submodule}`` and gets its ``__getattr__`` here.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from typing import Any, Callable


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``package.<table[name]>`` on first access of ``name``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def moved_names(old_module: str, new_module: str | Iterable[str], names: Iterable[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: each still resolves from ``old_module``, with a
    :class:`DeprecationWarning` naming the new import, so user code and configs (``_target_`` paths)
    written against the old layout keep working while they are updated.

    ``new_module`` is one module (then ``names`` lists what moved there) or several, searched in order
    for any public name (a module split into several)."""
    homes = [new_module] if isinstance(new_module, str) else list(new_module)
    moved = frozenset(names)

    def __getattr__(name: str) -> Any:
        if not name.startswith("_") and (not moved or name in moved):
            for home in homes:
                module = importlib.import_module(home)
                if hasattr(module, name):
                    warnings.warn(f"{old_module}.{name} moved to {home}.{name}; import it from there",
                                  DeprecationWarning, stacklevel=2)
                    return getattr(module, name)
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")

    return __getattr__
