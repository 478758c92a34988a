"""Whether a donor directory is intact: every file against the SHA-256 and size its manifest records.

The same check guards the donors shipped with the package (:data:`SHIPPED_DONORS`) and those built
into the cache: a damaged shipped file is an error, a damaged cache is rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import sha256_file
from .recipe import EmbeddedDonors, EmbeddedRecipe

#: the embedded donors built by ``python -m splitllama.embedded build --ship`` from the default recipe, shipped in the package
SHIPPED_DONORS = Path(__file__).parents[1] / "donors" / "embedded"


def manifest_files(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every file under ``root`` but the manifest: what a manifest
    records, and what :func:`verify_cache` checks."""
    return {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def verify_cache(path: str | os.PathLike[str]) -> list[str]:
    """Problems with a built donor directory (empty list: intact). Checks every file's size and hash."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest_path} unreadable: {exc}"]
    problems = []
    for rel, meta in files.items():
        file = root / rel
        if not file.is_file():
            problems.append(f"{file} missing")
        elif file.stat().st_size != meta["size"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, manifest says {meta['size']}")
        elif sha256_file(file) != meta["sha256"]:
            problems.append(f"{file} content does not match its SHA-256 in the manifest")
    return problems


def shipped_donors(recipe: EmbeddedRecipe, root: Path = SHIPPED_DONORS) -> EmbeddedDonors | None:
    """The donors shipped with the package if they were built from ``recipe`` (its :meth:`~EmbeddedRecipe.recipe_hash`),
    verified against their manifest; ``None`` for any other recipe (built and cached instead).

    Damaged shipped files are an error naming them, never a silent rebuild or wrong weights.
    """
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("recipe_hash") != recipe.recipe_hash():
        return None
    problems = verify_cache(root)
    if problems:
        raise RuntimeError(
            f"the shipped embedded donors in {root} do not match their manifest: {'; '.join(problems[:3])}; "
            "reinstall splitllama, or rebuild them with `python -m splitllama.embedded build --ship`"
        )
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, False)


__all__ = ["SHIPPED_DONORS", "manifest_files", "shipped_donors", "verify_cache"]
