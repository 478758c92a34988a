"""Whether a donor directory is intact: every file against the SHA-256 and size its manifest records.

The same check guards the donors shipped with the package (:data:`SHIPPED_DONORS`) and those built
into the cache: a damaged shipped file or manifest is an error (:class:`ShippedDonorsError`), a damaged cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import RunConfigError
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


class ShippedDonorsError(RunConfigError, RuntimeError):
    """The donors shipped with the package do not match their manifest (a file, or the manifest itself): an error
    naming the file, never a rebuild (hours on a CPU) nor other weights. A :class:`~splitllama.errors.RunConfigError`,
    so ``run.py`` ends with its one line."""


def manifest_recipe_problem(manifest: dict[str, Any]) -> str | None:
    """Why a manifest's ``recipe_hash`` is not the hash of the recipe it records (a damaged or edited manifest), or
    ``None``: the hash is recomputed as :meth:`~EmbeddedRecipe.recipe_hash` computes it, from the manifest's own
    ``recipe`` and ``recipe_version``."""
    recorded = manifest.get("recipe_hash")
    if not isinstance(manifest.get("recipe"), dict) or not isinstance(recorded, str):
        return "it records no recipe and recipe_hash"
    ident = {"version": manifest.get("recipe_version"), "recipe": manifest["recipe"]}
    own = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    if own != recorded:
        return (f"its recipe_hash {recorded[:16]}... is not the hash of the recipe it records ({own[:16]}...): "
                "the manifest was edited or damaged")
    return None


def shipped_donors(recipe: EmbeddedRecipe, root: Path = SHIPPED_DONORS) -> EmbeddedDonors | None:
    """The donors shipped with the package if they were built from ``recipe`` (its :meth:`~EmbeddedRecipe.recipe_hash`),
    verified against their manifest; ``None`` for another recipe than theirs and the package default (built and
    cached instead: building happens only when a run asks for another recipe).

    Shipped donors that do not match their manifest are a :class:`ShippedDonorsError` naming the file, never a
    silent rebuild or wrong weights: a damaged file, a manifest that is not JSON or whose recipe hash is not its
    recipe's, donors without a manifest, or donors built from another recipe than the default when the default
    is asked for.
    """
    manifest_path = root / "manifest.json"
    fix = ("reinstall splitllama (or restore the directory: git checkout splitllama/donors/embedded), or rebuild them "
           "with `python -m splitllama.embedded build --ship`")

    def refuse(problem: str) -> ShippedDonorsError:
        return ShippedDonorsError(f"donors.embedded: the shipped embedded donors in {root} do not match their manifest: "
                                  f"{problem}; {fix}")

    # they concern the default recipe (what the package ships them for) and the recipe their manifest records
    default = recipe == EmbeddedRecipe()
    if not manifest_path.is_file():
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        if present and default:
            raise refuse(f"{manifest_path} is missing (the directory holds {present[:4]})")
        return None  # an install without shipped donors, or another recipe: built
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        if not default:
            return None
        raise refuse(f"{manifest_path} cannot be read as JSON ({exc})") from None
    if not isinstance(manifest, dict):
        if not default:
            return None
        raise refuse(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an object")
    asked = json.loads(json.dumps(asdict(recipe)))
    if not default and manifest.get("recipe_hash") != recipe.recipe_hash() and manifest.get("recipe") != asked:
        return None  # another recipe than the shipped one: built and cached
    problem = manifest_recipe_problem(manifest)
    if problem:
        raise refuse(f"{manifest_path}: {problem}")
    if manifest["recipe_hash"] != recipe.recipe_hash():
        asked_for = "this version's default" if default else "the one asked for (the recipe format changed: RECIPE_VERSION)"
        raise refuse(f"{manifest_path}: they were built from another recipe than {asked_for} "
                     f"(recipe_hash {manifest['recipe_hash'][:16]}..., asked for {recipe.recipe_hash()[:16]}...)")
    problems = verify_cache(root)
    if problems:
        raise refuse("; ".join(problems[:3]))
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, False)


__all__ = ["SHIPPED_DONORS", "ShippedDonorsError", "manifest_files", "manifest_recipe_problem", "shipped_donors", "verify_cache"]
