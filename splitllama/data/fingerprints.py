"""What a run's data is, as hashes: a corpus's text and a tokenizer's mapping from text to ids.

Caches (packed blocks, donor scores, tuned references) and resume checks key on these, so a
changed corpus or tokenizer is a new key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything that decides a fast tokenizer's ids (its serialised pipeline and the
    bos/eos ids :func:`pack_documents` adds); ``None`` for a tokenizer that cannot be serialised,
    whose blocks are then not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    ident = json.dumps([backend.to_str(), tokenizer.bos_token_id, tokenizer.eos_token_id])
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def tokenizer_mapping(tokenizer: Any) -> dict[str, Any] | None:
    """What decides which id a fast tokenizer gives to which text, in parts that can be compared across two
    tokenizers: ``vocabulary`` (token -> id, added tokens included), ``merges`` (a BPE model's), ``special
    tokens`` (bos/eos/pad/unk and every added special token, with their ids) and ``normalization`` (the
    normalizer and pre-tokenizer). ``None`` for a tokenizer that cannot be serialised. Settings that do not
    change the mapping (padding, truncation, the decoder) are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = json.loads(backend.to_str())
    model = pipeline.get("model") or {}
    specials = {name: (getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None))
                for name in ("bos", "eos", "pad", "unk")}
    added = sorted((t["content"], t["id"]) for t in pipeline.get("added_tokens") or [] if t.get("special"))
    return {
        "vocabulary": tokenizer.get_vocab(),
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        "special tokens": {"named": specials, "added": added},
        "normalization": {"normalizer": pipeline.get("normalizer"), "pre_tokenizer": pipeline.get("pre_tokenizer"),
                          "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")}},
    }


def documents_fingerprint(documents: Sequence[str]) -> str:
    """SHA-256 of a corpus: each document's text, in order (what a run's data is, wherever its files lie)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
