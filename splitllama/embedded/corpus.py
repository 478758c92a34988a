"""Which text the embedded donors learn: the standard library's and installed packages' Python, read offline.

The corpora (:data:`CORPORA`) are read deterministically on any machine (files in sorted order, no
tests, no site-packages for the stdlib) and cached as JSON under ``<cache_dir>/corpus/``, keyed by
:func:`corpus_key` (this interpreter, its stdlib and the installed packages' versions).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..files import sha256_file

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
#: the packages of a default install whose source the default recipe's corpus reads after the stdlib
DEFAULT_CORPUS_PACKAGES: tuple[str, ...] = (
    "torch", "transformers", "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "wandb",
    "numpy", "pandas", "matplotlib", "networkx", "sympy", "datasets", "huggingface_hub", "lm_eval", "tokenizers", "safetensors", "tqdm",
    "jinja2", "yaml", "fsspec",
)
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"})


def default_cache_dir() -> Path:
    """``$SPLITLLAMA_CACHE`` if set, else ``~/.cache/splitllama``."""
    return Path(os.environ.get("SPLITLLAMA_CACHE") or Path.home() / ".cache" / "splitllama").expanduser()


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)


def stdlib_sources(paths: Iterable[Path] | None = None) -> Iterator[tuple[Path, str]]:
    """``(path, source text)`` of each standard-library file that reads as UTF-8: the one reading
    rule of the ``stdlib_source`` corpus (whose documents are these texts) and of whatever must
    know which file a document came from (the downstream tasks' held-out items)."""
    for path in stdlib_files() if paths is None else paths:
        try:
            yield path, path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def collect_stdlib_source(min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None) -> list[str]:
    """Each standard-library module's source text (UTF-8; at least ``min_chars`` characters), in a deterministic order."""
    from tqdm.auto import tqdm

    files = tqdm(stdlib_files(), desc="corpus: stdlib source", unit="file", disable=not progress)
    return [text for _, text in stdlib_sources(files) if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars)]


def package_root(name: str) -> Path:
    """The directory of the installed top-level package ``name`` (in this interpreter's site-packages)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"donors.embedded.packages: {name!r} is not an installed package in this environment "
            f"({sys.executable}); install it (the default install has every package the shipped recipe names) or drop it from the recipe"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_files(name: str) -> list[Path]:
    """The ``.py`` files of an installed package (no test directories), sorted."""
    root = package_root(name)
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """The installed distribution version of each top-level package (``None`` where metadata names none)."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    versions: dict[str, str | None] = {}
    for name in packages:
        dists = owners.get(name) or []
        versions[name] = metadata.version(dists[0]) if dists else None
    return versions


def collect_python_source(
    min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None
) -> list[str]:
    """The stdlib source (:func:`collect_stdlib_source`) followed by the ``.py`` files of the installed
    ``packages`` (each sorted by path; no tests), de-duplicated, each at least ``min_chars`` and at most
    ``max_chars`` characters (generated tables and vendored bundles above it are skipped).

    Why: the stdlib source is 3.3M tokens, too little for a 10-layer donor to show its size; the
    Python source of the packages a default install brings (torch, transformers, ...) is about
    100 MB more, on every machine, offline. Validation membership stays a hash of each document's
    text (:func:`splitllama.data.in_validation`), so the stdlib files a run validates on
    are held out here too.
    """
    from tqdm.auto import tqdm

    documents = collect_stdlib_source(min_chars, progress=progress, max_chars=max_chars)
    seen = set(documents)
    for name in packages:
        files = tqdm(package_files(name), desc=f"corpus: {name} source", unit="file", disable=not progress)
        for _, text in stdlib_sources(files):
            if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars) and text not in seen:
                seen.add(text)
                documents.append(text)
    return documents


def collect_stdlib_docstrings(min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None) -> list[str]:
    """Module, class and function docstrings of the standard library, in a deterministic order."""
    from tqdm.auto import tqdm

    documents: list[str] = []
    seen: set[str] = set()
    for path in tqdm(stdlib_files(), desc="corpus: stdlib docstrings", unit="file", disable=not progress):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    documents.append(doc)
    return documents


#: corpus name -> the function that collects it (``EmbeddedRecipe.corpus``, ``data.source``)
CORPORA = {"stdlib_source": collect_stdlib_source, "stdlib_docstrings": collect_stdlib_docstrings, "python_source": collect_python_source}


def corpus_key(min_chars: int, corpus: str = "stdlib_docstrings", packages: Sequence[str] = (), max_chars: int | None = None) -> str:
    """The cache key of a corpus as this machine reads it: its settings, this Python and its stdlib, and the
    installed versions of ``packages``; whatever else reads the same documents (the downstream tasks) keys on it too."""
    ident: dict[str, Any] = {"version": CORPUS_VERSION, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "min_chars": min_chars}
    if corpus != "stdlib_docstrings":  # the docstrings' key predates the choice; keep their cached files valid
        ident["corpus"] = corpus
    if packages:  # which packages, at which installed versions (a changed install is another corpus)
        ident["packages"] = package_versions(packages)
    if max_chars is not None:
        ident["max_chars"] = max_chars
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_stdlib_corpus(
    cache_dir: str | os.PathLike[str] | None = None, min_chars: int = 80, *, corpus: str = "stdlib_docstrings", progress: bool = True,
    packages: Sequence[str] = (), max_chars: int | None = None,
) -> list[str]:
    """A corpus of :data:`CORPORA`, cached as JSON under ``<cache_dir>/corpus/`` (verified by hash)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r}: unknown; one of {', '.join(CORPORA)}")
    if packages and corpus != "python_source":
        raise ValueError(f"packages={list(packages)}: only corpus='python_source' reads installed packages (corpus={corpus!r})")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "corpus" / f"{corpus.replace('_', '-')}-{corpus_key(min_chars, corpus, packages, max_chars)}.json"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(path):
        return json.loads(path.read_text(encoding="utf-8"))
    documents = CORPORA[corpus](min_chars, progress=progress, packages=packages, max_chars=max_chars)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(documents), encoding="utf-8")
        os.replace(tmp, path)
        sidecar.write_text(sha256_file(path))
    except OSError as exc:  # a full disk: the documents are in memory; a half-written sidecar fails the hash next time
        logger.warning("corpus: could not cache %s (%s); the next run collects it again", path, exc)
    finally:  # gone once renamed; a write that failed or was interrupted leaves no partial file
        tmp.unlink(missing_ok=True)
    return documents


__all__ = [
    "CORPORA",
    "CORPUS_VERSION",
    "DEFAULT_CORPUS_PACKAGES",
    "STDLIB_SKIP_DIRS",
    "collect_python_source",
    "collect_stdlib_docstrings",
    "collect_stdlib_source",
    "corpus_key",
    "default_cache_dir",
    "load_stdlib_corpus",
    "package_files",
    "package_root",
    "package_versions",
    "stdlib_files",
    "stdlib_sources",
]
