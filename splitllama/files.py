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


def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why this user cannot create and write files under the directory ``path`` (made on first use, so it may not
    exist yet), or ``None``. Asks the kernel (``os.access``, which knows this user, root's privileges and a read-only
    mount) of ``path`` or of its nearest existing parent; creates nothing."""
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a symbolic link to {os.readlink(existing)}, which does not exist"
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return (f"{path} names a file, not a directory" if existing == path
                else f"{path} cannot be made: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        readonly = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1))
        why = "is on a read-only file system" if readonly else "is not writable by this user"
        return f"{path} {why}" if existing == path else f"{path} cannot be made: {existing} {why}"
    return None


def zip_archive_problem(path: str | os.PathLike[str], what: str = "archive") -> str | None:
    """What is wrong with the zip archive at ``path`` (a ``torch.save`` file: a token-block cache, a Lightning
    checkpoint), or ``None`` when it reads whole; ``what`` names it in the message.

    ``torch.load`` checks neither that the archive is complete nor the CRC-32 stored for each member, and torch
    stores tensors uncompressed: a byte changed on disk loads as another value. :meth:`zipfile.ZipFile.testzip`
    reads every member against its CRC (one read of the file)."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        return f"not a readable {what} (truncated or corrupt: {exc})"
    if bad is not None:
        return f"damaged: its member {bad} fails its CRC-32 check (its bytes changed after the {what} was written)"
    return None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["file_lock", "sha256_file", "writable_dir_problem", "zip_archive_problem"]
