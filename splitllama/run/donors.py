"""The donors of a run: where they are (given, or the embedded ones built and cached), their tokenizers
compared, and their scores on the run's validation blocks (the references every result is read against).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ..configuration_split_llama import SplitLlamaConfig
from ..errors import RunConfigError
from .settings import cache_dir, embedded_recipe, uses_embedded_donors

if TYPE_CHECKING:
    from ..references import DonorReferences

logger = logging.getLogger(__name__)


@dataclass
class Donors:
    path8b: str
    path70b: str
    #: the embedded donors' manifest (recipe, build metrics), or None for user donors
    manifest: dict[str, Any] | None = None
    built_now: bool = False


def resolve_donors(cfg: DictConfig) -> Donors:
    """User donors as given, or the embedded tiny donors (built on first use, then cached)."""
    if not uses_embedded_donors(cfg):
        return Donors(os.path.expanduser(cfg.donors.path8b), os.path.expanduser(cfg.donors.path70b))
    from ..embedded import ensure_embedded_donors

    built = ensure_embedded_donors(embedded_recipe(cfg), cache_dir(cfg), progress=cfg.trainer.enable_progress_bar)
    return Donors(str(built.path8b), str(built.path70b), built.manifest, built.built_now)


#: what saving a donor adds to the ``LlamaConfig`` it was built from (its class, its dtype, the library's version)
SAVED_DONOR_FIELDS = frozenset({"architectures", "dtype", "transformers_version"})


def with_built_donors(split: SplitLlamaConfig, donors: Donors) -> SplitLlamaConfig:
    """The embedded donors' split config, validated from their recipe before they were built (:func:`validate`),
    given the built donors: their directories, and their own ``config.json`` in place of the recipe's
    ``LlamaConfig`` once it is shown to be that config (saving adds only :data:`SAVED_DONOR_FIELDS`), so the
    split model is what a config built from the directories would describe. Not validated again.

    A built donor that is not its recipe (a cache entry written by other code) is an error naming the field.
    """
    from transformers import LlamaConfig

    for which, key, path in (("small", "8b", donors.path8b), ("large", "70b", donors.path70b)):
        built = LlamaConfig.from_pretrained(path)
        recipe, saved = getattr(split, f"config_{key}").to_dict(), built.to_dict()
        for name in sorted((recipe.keys() | saved.keys()) - SAVED_DONOR_FIELDS):
            if recipe.get(name) != saved.get(name):
                raise RunConfigError(
                    f"donors.embedded: the built {which} donor ({path}) has {name}={saved.get(name)!r}, but its recipe gives "
                    f"{recipe.get(name)!r}; delete that cache entry (rm -r {Path(path).parent}) and run again to rebuild it"
                )
        setattr(split, f"config_{key}", built)
        setattr(split, f"path{key}", path)
    return split


def check_donor_files(cfg: DictConfig, donors: Donors, *, given_by: str | None = None) -> None:
    """Both donors' files checked where they are first read, before either is scored, assembled or tokenised
    (:func:`~splitllama.checkpoint.check_model_dir`: config, index, every shard's header against its size,
    tokenizer and generation files): a truncated shard or index of the large donor fails here naming the file,
    not after the small donor was scored. The embedded donors are skipped: their manifest's SHA-256 of every
    file was checked when they were resolved. ``given_by``: what named these donors when the run's settings did
    not (the saved split model whose config holds their paths)."""
    from ..checkpoint import check_model_dir

    if given_by is None and uses_embedded_donors(cfg):
        return
    for key, path in (("path8b", donors.path8b), ("path70b", donors.path70b)):
        hub = cfg.donors.get(key.replace("path", "hub")) if given_by is None else None
        fetch = f" (hf download {hub} --local-dir {path})" if hub else ""
        if given_by is None:
            setting = f"donors.{key}={cfg.donors[key]}"
            fix = f"Download or copy that checkpoint again{fetch}, or give another donors.{key}"
        else:
            setting = f"{given_by}: its donor {key}={path}"
            fix = "Restore that donor, or set eval.references=false to evaluate without the donors' scores"
        check_model_dir(path, setting, model_types=("llama",), fix=fix)


def saved_model_donors(split: SplitLlamaConfig) -> Donors | None:
    """The donors a saved split model was assembled from (its config's paths), if both directories still exist."""
    paths = (split.path8b, split.path70b)
    if all(p is not None and Path(p).is_dir() for p in paths):
        return Donors(*paths)  # type: ignore[arg-type]
    return None


def donor_references(cfg: DictConfig, donors: Donors, val_blocks: Any) -> DonorReferences | None:
    """Both donors scored on the run's validation blocks (cached), or ``None`` with ``eval.references=false``.

    See :mod:`splitllama.references`; scored on the GPU when the run trains on one.
    """
    if not cfg.eval.references:
        return None
    import torch

    from ..references import score_references

    device = "cuda" if torch.cuda.is_available() and cfg.parallel.accelerator in ("auto", "gpu", "cuda") else "cpu"
    return score_references(
        donors.path8b, donors.path70b, val_blocks, cache_dir=cache_dir(cfg), batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
        dtype=cfg.backend.dtype, attn_implementation=cfg.backend.attn_implementation, device=device,
    )


def load_tokenizer(path: str, setting: str | None = None) -> Any:
    """The split model's tokenizer: the small donor's (or a saved split model's). ``setting``: the override that
    gave ``path`` (``donors.path8b=...``, ``task.model_dir=...``), named in the error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        where = f"{setting}: {path}" if setting else str(path)
        raise RunConfigError(f"{where}: cannot load the tokenizer ({exc}); the directory must hold its tokenizer files (tokenizer.json, "
                             "tokenizer_config.json): copy them from the model's Hugging Face repository into it, or export a "
                             "saved split model again") from exc


def check_donor_tokenizers(cfg: DictConfig, donors: Donors, tokenizer: Any, record: Any) -> None:
    """The large donor's tokenizer (where it ships one) maps text to the same ids as the small donor's, which
    the split model reads with: same vocabulary, merges, special tokens and normalization
    (:func:`~splitllama.data.tokenizer_mapping`); a shared vocabulary size is not enough (a permuted
    vocabulary gives each id another meaning in the large donor's layers and head). A mismatch is an error
    naming each part that differs, or, with ``donors.allow_tokenizer_mismatch=true``, a warning recorded in
    results.json (``donors.tokenizers``)."""
    from ..data import tokenizer_mapping

    large_dir = Path(donors.path70b)
    if not any((large_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        record.update("donors", {"tokenizers": "not compared: the large donor ships no tokenizer"})
        return
    small, large = tokenizer_mapping(tokenizer), tokenizer_mapping(load_tokenizer(str(large_dir), None if uses_embedded_donors(cfg) else f"donors.path70b={cfg.donors.path70b}"))
    if small is None or large is None:
        record.update("donors", {"tokenizers": "not compared: a donor's tokenizer is not a fast (serialisable) tokenizer"})
        return
    differ = [part for part in small if small[part] != large[part]]
    if not differ:
        record.update("donors", {"tokenizers": "same"})
        return
    moved = sum(1 for token, index in small["vocabulary"].items() if large["vocabulary"].get(token) != index)
    parts = ", ".join(f"vocabulary ({moved} of {len(small['vocabulary'])} tokens have another id or none)" if p == "vocabulary" else p
                      for p in differ)
    message = (f"the large donor's tokenizer ({large_dir}) differs from the small donor's ({donors.path8b}), which the split "
               f"model reads with, in: {parts}; a token id would mean one thing in the small donor's layers and another in "
               "the large donor's")
    if not cfg.donors.allow_tokenizer_mismatch:
        raise RunConfigError(f"donors: {message}. Give donors that share a tokenizer, or donors.allow_tokenizer_mismatch=true "
                             "to run anyway (results.json records it)")
    logger.warning("donors.allow_tokenizer_mismatch=true: %s", message)
    record.update("donors", {"tokenizers": {"mismatch_allowed": differ, "message": message}})


__all__ = ["SAVED_DONOR_FIELDS", "Donors", "check_donor_files", "check_donor_tokenizers", "donor_references", "load_tokenizer", "resolve_donors", "saved_model_donors", "with_built_donors"]
