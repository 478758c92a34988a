"""Saving the split model: an HF checkpoint written whole under its name, or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def export_model(backend: Any, export_dir: str | os.PathLike[str], tokenizer: Any, *, writer: bool = True) -> Path:
    """``backend.export_hf`` into ``.<name>.partial`` beside ``export_dir``, renamed to ``export_dir`` once
    complete (replacing an earlier export of the run); on a failure (a full disk) the partial directory is
    removed, so no half-saved model is left under the export's name. ``writer``: this process writes (rank 0;
    the other ranks of a collective export only take part in the gather)."""
    import shutil

    out = Path(export_dir)
    partial, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        backend.export_hf(partial, tokenizer)
    except BaseException:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if writer:
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["export_model"]
