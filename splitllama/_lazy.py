"""Lazy package attributes (PEP 562), so ``import splitllama`` stays light.

Importing the package must not import vLLM, megatron-core or even the assembly code: vLLM's
plugin loader imports ``splitllama`` in every worker process, and a CPU-only install has no
megatron-core. Each package lists ``{attribute: submodule}`` and gets its ``__getattr__`` here.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``package.<table[name]>`` on first access of ``name``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
