"""Small file utilities shared by every floor: a lock between processes and a file's SHA-256.

Ground floor: the embedded donors' build, the donor scores, the downstream-task references and
the harness cache all take the same lock and hash the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder) for the ``with`` block.

    The kernel drops the lock when its process dies, so a killed build or score never leaves a
    lock that a later run must clean."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["file_lock", "sha256_file"]
