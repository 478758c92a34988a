"""The donors as the reference of every result: each donor scored on the run's own validation blocks.

A split model is worth something when it lands between its donors: better than the small donor
alone, approaching the large one. A validation loss alone cannot say that, so every run scores
both donors (plain ``LlamaForCausalLM``, read from their checkpoint directories) on exactly the
token blocks the split model is validated on, and reports

    gap_closed = (small - split) / (small - large)

0 at the small donor's loss, 1 at the large donor's, negative when the split is worse than the
small donor, above 1 when it beats the large one.

A donor's score depends only on its weights and the blocks, so it is cached per (donor
checkpoint, blocks, dtype): ``<cache_dir>/references/<key>.json``. A sweep over layer counts
scores each donor once; real donors work the same way (the key fingerprints their weight files by
name, size and modification time, so a replaced checkpoint is scored again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import file_lock

logger = logging.getLogger(__name__)

#: Bump when what a cached score means changes (the loss definition, the key).
REFERENCES_VERSION = 1
#: The files of a checkpoint directory whose identity keys its cached score.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".json")


@dataclass(frozen=True)
class DonorScore:
    """One donor's validation loss on the run's blocks (``cached``: read from an earlier run's score)."""

    path: str
    val_loss: float
    cached: bool

    def as_record(self) -> dict[str, Any]:
        return {"val_loss": self.val_loss, "path": self.path, "cached": self.cached}


def gap_undefined(small_loss: float, large_loss: float) -> str | None:
    """Why ``gap_closed`` has no value for these donors (``None``: it has one)."""
    if not (math.isfinite(small_loss) and math.isfinite(large_loss)):
        return f"a donor's loss is not finite (small {small_loss}, large {large_loss})"
    if abs(small_loss - large_loss) < 1e-9:
        return f"the donors score the same ({small_loss:.6g}): there is no gap to close"
    return None


def gap_closed(split_loss: float | None, small_loss: float, large_loss: float) -> float | None:
    """``(small - split) / (small - large)``; ``None`` when a loss is missing or the donors score the same."""
    if split_loss is None or not math.isfinite(split_loss) or gap_undefined(small_loss, large_loss):
        return None
    return (small_loss - split_loss) / (small_loss - large_loss)


def blocks_fingerprint(blocks: Any) -> str:
    """SHA-256 of a ``(n, seq_len)`` token tensor's shape and values: which data a score is on."""
    import numpy as np

    array = np.ascontiguousarray(blocks.cpu().numpy().astype(np.int64))
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of a checkpoint directory's weight and config files, sorted."""
    root = Path(path)
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.iterdir()
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES
    )


def score_key(path: str | os.PathLike[str], blocks_sha: str, dtype: str) -> str:
    ident = {
        "version": REFERENCES_VERSION, "path": str(Path(path).resolve()), "files": checkpoint_fingerprint(path),
        "blocks": blocks_sha, "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def check_vocabulary(path: str | os.PathLike[str], blocks: Any, which: str) -> None:
    """The donor's vocabulary must cover every token id of the blocks (read from config.json, no weights)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    top = int(blocks.max())
    if top >= vocab:
        raise ValueError(
            f"donors: the {which} donor at {path} has vocab_size={vocab} but the validation data holds token id {top}: "
            "the donors must share the small donor's tokenizer (or set eval.references=false)"
        )


def score_donor(
    path: str | os.PathLike[str], blocks: Any, *, which: str, cache_dir: str | os.PathLike[str], batch_size: int = 8,
    dtype: str = "float32", attn_implementation: str = "sdpa", device: str = "cpu",
) -> DonorScore:
    """Mean next-token loss of the donor at ``path`` over ``blocks``, from the cache or computed (then cached).

    The loss is the one the split model's ``val/loss`` is (every predicted token weighted equally),
    computed by :func:`splitllama.embedded.evaluate_lm`.
    """
    import torch
    from transformers import LlamaForCausalLM

    from .embedded import evaluate_lm

    blocks_sha = blocks_fingerprint(blocks)
    key = score_key(path, blocks_sha, dtype)
    cache_file = Path(cache_dir).expanduser() / "references" / f"{key}.json"
    # one process scores, the others (DDP ranks, parallel sweep jobs) wait and read its result
    with file_lock(cache_file.with_suffix(".lock")):
        if cache_file.is_file():
            try:
                return DonorScore(str(path), float(json.loads(cache_file.read_text())["val_loss"]), cached=True)
            except (ValueError, KeyError):
                logger.warning("reference score %s unreadable, scoring again", cache_file)
        check_vocabulary(path, blocks, which)
        logger.info("scoring the %s donor %s on %d validation blocks", which, path, blocks.shape[0])
        model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
        val_loss = evaluate_lm(model.to(device), blocks, batch_size=batch_size)
        del model
        record = {"val_loss": val_loss, "path": str(path), "which": which, "blocks": list(blocks.shape),
                  "blocks_sha256": blocks_sha, "dtype": dtype}
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, cache_file)
    return DonorScore(str(path), val_loss, cached=False)


@dataclass(frozen=True)
class DonorReferences:
    """Both donors' validation losses on one set of blocks, and the gap a split model closes."""

    small: DonorScore
    large: DonorScore
    val_blocks: int

    def gap_closed(self, split_loss: float | None) -> float | None:
        return gap_closed(split_loss, self.small.val_loss, self.large.val_loss)

    def as_record(self) -> dict[str, Any]:
        """``results.json``'s ``references``: ``{small: {val_loss, path, cached}, large: {...}, val_blocks, note}``
        (``note``: why ``gap_closed`` is null, or a warning that the donors are in the wrong order)."""
        note = gap_undefined(self.small.val_loss, self.large.val_loss)
        if note is None and self.large.val_loss > self.small.val_loss:
            note = "the large donor scores worse than the small one: gap_closed counts toward the worse donor"
        return {"small": self.small.as_record(), "large": self.large.as_record(), "val_blocks": self.val_blocks,
                "note": note}

    def metrics(self, val_loss: float | None, val_loss_before: float | None) -> dict[str, float | None]:
        """``gap_closed`` and ``gap_closed_before`` of a run's losses after and before training."""
        return {"gap_closed": self.gap_closed(val_loss), "gap_closed_before": self.gap_closed(val_loss_before)}

    def log_values(self) -> dict[str, float]:
        """What the loggers get (W&B summary / metrics.csv)."""
        return {"ref/small_val_loss": self.small.val_loss, "ref/large_val_loss": self.large.val_loss}


def score_references(
    small_path: str | os.PathLike[str], large_path: str | os.PathLike[str], blocks: Any, *,
    cache_dir: str | os.PathLike[str], batch_size: int = 8, dtype: str = "float32", attn_implementation: str = "sdpa",
    device: str = "cpu",
) -> DonorReferences:
    """Score both donors on ``blocks`` (one at a time, so only one is in memory)."""
    options = dict(cache_dir=cache_dir, batch_size=batch_size, dtype=dtype, attn_implementation=attn_implementation, device=device)
    small = score_donor(small_path, blocks, which="small", **options)
    large = score_donor(large_path, blocks, which="large", **options)
    return DonorReferences(small, large, val_blocks=int(blocks.shape[0]))


__all__ = [
    "DonorReferences",
    "DonorScore",
    "blocks_fingerprint",
    "checkpoint_fingerprint",
    "gap_closed",
    "gap_undefined",
    "score_donor",
    "score_references",
]
