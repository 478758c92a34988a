"""Documents -> packed token blocks: the one packing rule every model of the project trains and is scored on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..files import zip_archive_problem
from .fingerprints import documents_fingerprint, tokenizer_fingerprint
from .validation import split_documents

logger = logging.getLogger("splitllama.data")


def pack_documents(tokenizer: Any, documents: Sequence[str], seq_len: int, *, chunk: int = 512) -> torch.Tensor:
    """Tokenise documents as ``bos + text + eos``, concatenate, cut into ``(n, seq_len)`` blocks.

    Special tokens are added here explicitly (not by the tokenizer's template), so every
    tokenizer packs the same way. The tail shorter than one block is dropped.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(documents), chunk):
        batch = list(documents[start : start + chunk])
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if bos is not None:
                stream.append(bos)
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"data.seq_len={seq_len}: the documents hold {len(stream)} tokens, fewer than one block; give a "
                         f"smaller data.seq_len (at most {len(stream)}) or more text (data.files)")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


#: bump when the packing rule changes, so cached blocks from the old rule are not reused
PACKING_VERSION = 1



def packed_splits(
    tokenizer: Any, documents: Sequence[str], seq_len: int, val_fraction: float, *, cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, val_blocks)``: :func:`split_documents`, then :func:`pack_documents` for each.

    Tokenising is the costly part of a run's start (seconds per MB of text on a laptop core) and
    gives the same blocks every time, so with ``cache_dir`` the blocks are kept in
    ``<cache_dir>/blocks/<key>.pt``, keyed by the tokenizer's fingerprint, the documents' text,
    ``seq_len``, ``val_fraction`` and :data:`PACKING_VERSION`: any change to one of them is a new
    key, never a stale hit. The file is written whole under a temporary name and renamed, so an
    interrupted run or a second rank leaves no half-written cache.
    """
    fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    path: Path | None = None
    if fingerprint is not None:
        key = json.dumps([PACKING_VERSION, fingerprint, seq_len, val_fraction, len(documents), documents_fingerprint(documents)])
        path = Path(os.path.expanduser(cache_dir)) / "blocks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"  # type: ignore[arg-type]
        damaged = zip_archive_problem(path) if path.is_file() else None
        if damaged:  # a changed byte would load as another token id
            logger.warning("data: ignoring the block cache %s, which is %s; tokenising again", path, damaged)
        elif path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                train, val = cached["train"].long(), cached["val"].long()
                if train.dim() == val.dim() == 2 and train.shape[1] == val.shape[1] == seq_len:
                    logger.info("data: packed blocks from the cache %s", path)
                    return train, val
            except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, not trusted
                logger.warning("data: ignoring the unreadable block cache %s (%s)", path, exc)
    train_docs, val_docs = split_documents(documents, val_fraction)
    train, val = pack_documents(tokenizer, train_docs, seq_len), pack_documents(tokenizer, val_docs, seq_len)
    if path is not None:
        small = torch.int32 if max(int(train.max()), int(val.max())) < 2**31 else torch.long
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train": train.to(small), "val": val.to(small)}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # a full disk (torch's writer raises RuntimeError): the blocks are in
            # memory, the run goes on without caching them
            logger.warning("data: could not cache the packed blocks in %s (%s); the next run tokenises again", path, exc)
        finally:  # gone once renamed; a write that failed or was interrupted leaves no partial file
            tmp.unlink(missing_ok=True)
    return train, val
