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
    the other ranks of a collective export only take part in the gather).

    Whose ``export_dir`` is was checked before the run started (:func:`~splitllama.run.outcome.check_outputs`);
    here, as a last guard, a directory that is a run's (its ``results.json`` or claim) or holds one is never
    replaced, and the mark naming the run that owns an export outside its run directory is kept."""
    import shutil

    from ..errors import RunConfigError
    from ..results import OUTPUT_MARK, enclosing_run

    out = Path(export_dir)
    partial, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    if writer and out.exists():
        resolved = out.resolve()
        owner = enclosing_run(resolved)
        if owner == resolved or (owner is None and Path.cwd().resolve().is_relative_to(resolved)):
            raise RunConfigError(f"paths.export_dir={export_dir}: {out} is a run directory or holds the working directory, "
                                 "which an export would replace whole; give a new directory for the export")
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        backend.export_hf(partial, tokenizer)
    except BaseException:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if writer:
        if (out / OUTPUT_MARK).is_file():
            shutil.copy2(out / OUTPUT_MARK, partial / OUTPUT_MARK)
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["export_model"]
