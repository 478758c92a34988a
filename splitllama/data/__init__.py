"""The data layer: documents, the validation split, packing and fingerprints.

The ground floor of the package: the embedded donors, the downstream tasks and training all
read their text through it, so a document is held out, packed and hashed the same way
everywhere. It imports nothing of splitllama but :mod:`splitllama.errors`.
"""

from __future__ import annotations

from .documents import read_text_files
from .fingerprints import documents_fingerprint, tokenizer_fingerprint, tokenizer_mapping
from .packing import PACKING_VERSION, pack_documents, packed_splits
from .validation import VALIDATION_SALT, in_validation, split_documents

__all__ = [
    "PACKING_VERSION",
    "VALIDATION_SALT",
    "documents_fingerprint",
    "in_validation",
    "pack_documents",
    "packed_splits",
    "read_text_files",
    "split_documents",
    "tokenizer_fingerprint",
    "tokenizer_mapping",
]
