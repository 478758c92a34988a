"""Which documents are held out for validation: a stable hash of each document's text.

The split is by *document*, before packing, so no validation text ever reaches training (a
block never straddles the two). Membership is a hash of the document's text, so it does not
depend on corpus order, and the validation set of a smaller ``val_fraction`` is a subset of that
of a larger one: the embedded donors hold out the same documents the split model is scored on,
and the downstream tasks hold out the same files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

VALIDATION_SALT = "splitllama-validation"


def in_validation(document: str, val_fraction: float) -> bool:
    """Whether ``document`` belongs to the validation split (a stable hash of its text)."""
    digest = hashlib.sha1((VALIDATION_SALT + document).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split documents into (train, validation), keeping corpus order within each."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    train: list[str] = []
    val: list[str] = []
    for doc in documents:
        (val if in_validation(doc, val_fraction) else train).append(doc)
    if not train or not val:
        raise ValueError(
            f"data.val_fraction={val_fraction}: {len(documents)} documents give {len(train)} for training and "
            f"{len(val)} for validation; both need at least one: give more documents (data.files), or a data.val_fraction "
            f"{'above' if not val else 'below'} {val_fraction}"
        )
    return train, val
