"""What exactly a corpus was, and how it travels: its identity, and a pack another machine builds from.

The donors are built where a GPU is, which may run another Python with other packages (another
corpus); a corpus pack carries this machine's exact documents there, checked by their SHA-256.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..data import documents_fingerprint
from .corpus import package_versions
from .recipe import EmbeddedRecipe


def corpus_identity(recipe: EmbeddedRecipe, documents: Sequence[str]) -> dict[str, Any]:
    """What exactly a corpus was: its documents' SHA-256 and size, and where they were read (Python, packages)."""
    return {
        "corpus": recipe.corpus, "documents": len(documents), "chars": sum(map(len, documents)), "sha256": documents_fingerprint(documents),
        "python": sys.version.split()[0], "packages": package_versions(recipe.packages) if recipe.packages else {},
    }


def write_corpus_pack(recipe: EmbeddedRecipe, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write this machine's corpus of ``recipe`` as an xz-compressed JSON ``{identity, documents}``: the
    exact text another machine (a GPU with another Python) builds the donors from."""
    documents = recipe.corpus_documents(cache_dir)
    identity = corpus_identity(recipe, documents)
    with lzma.open(path, "wt", encoding="utf-8", preset=6) as handle:
        json.dump({"identity": identity, "documents": documents}, handle)
    return identity


def read_corpus_pack(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(identity, documents)`` of a pack written by :func:`write_corpus_pack`, checked against its identity."""
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        pack = json.load(handle)
    identity, documents = pack["identity"], pack["documents"]
    if documents_fingerprint(documents) != identity["sha256"]:
        raise ValueError(f"{path}: its documents do not match the SHA-256 its identity records (a damaged corpus pack); copy "
                         "the pack again from the machine that wrote it")
    return identity, documents


__all__ = ["corpus_identity", "read_corpus_pack", "write_corpus_pack"]
