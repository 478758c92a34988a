"""Read what an offline W&B run logged, from its binary ``run-<id>.wandb`` file.

wandb 0.31 in offline mode writes no ``wandb-summary.json`` and ships no Python reader for its
transaction log, so tests and sweep analyses read the file themselves. The format:

- a 7-byte header: ``b":W&B"``, magic ``0xBEE1`` (little-endian uint16), version byte ``0``;
- then LevelDB's log format: 32 KiB blocks; each fragment is a 4-byte CRC-32, a 2-byte
  little-endian length and a 1-byte type (1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST), then the payload;
  a block tail shorter than a fragment header is zero padding. The CRC is zlib's CRC-32 of the
  type byte followed by the payload;
- each reassembled payload is a serialized ``wandb_internal_pb2.Record``.

wandb-core buffers the block being filled and writes it only when it is full or when the run's
stream closes, which happens *after* ``run.finish()`` returns (the finish notice to the service is
not waited on). A file read in between ends at a block boundary, often inside a record whose
FIRST fragment is written and whose LAST is not: the reader reports that (strict) instead of
returning fewer rows. ``wandb.teardown()`` waits for the service to exit, so the file is whole;
a ``run.py`` process that has exited has done it (its exit hook tears the service down).

History rows come from ``Record.history`` items, summary updates from ``Record.summary``, the
run's config/tags/group from ``Record.run`` and ``Record.config``. Values are JSON (``value_json``);
nested keys (``nested_key``) are joined with ``/``.

    run = read_offline_run("outputs/.../wandb/offline-run-.../run-abc.wandb")
    run.history          # [{"_step": 0, "train/loss": 9.1, ...}, ...]
    run.summary          # {"val/loss": 5.2, ...}
    run.column("train/loss")
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
FRAGMENT_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log, or it is damaged; the message says where."""


def iter_record_bytes(path: str | os.PathLike[str], *, strict: bool = True) -> Iterator[bytes]:
    """Yield the payload of every record in a ``.wandb`` file, reassembling fragments.

    With ``strict=False`` a damaged or truncated tail ends the iteration instead of raising
    (a run still being written, or killed, has one). A file that ends inside a record (its
    FIRST fragment read, no LAST) is such a tail even when it ends exactly at a block boundary.
    """
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise WandbFileError(f"{path}: not a W&B transaction log (header {data[:7]!r}, expected {HEADER!r})")
    pos, pending = len(HEADER), bytearray()
    in_record, record_start = False, 0
    while True:
        if pos >= len(data):
            if in_record and strict:
                raise WandbFileError(
                    f"{path}: the file ends inside the record that starts at byte {record_start} (no LAST fragment): "
                    "it is still being written (wandb-core writes its last block when the run's stream closes, "
                    "after run.finish() returns; wandb.teardown() waits for that) or its writer was killed"
                )
            return
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < FRAGMENT_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        if pos + FRAGMENT_HEADER > len(data):
            if strict:
                raise WandbFileError(f"{path}: truncated fragment header at byte {pos}")
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero-filled space at the end of a block
            pos += left_in_block
            continue
        start, end = pos + FRAGMENT_HEADER, pos + FRAGMENT_HEADER + length
        payload = data[start:end]
        problem = None
        if length > left_in_block - FRAGMENT_HEADER:
            problem = f"the fragment at byte {pos} ({length} bytes) runs past the end of its 32 KiB block"
        elif end > len(data):
            problem = f"truncated record at byte {pos}"
        elif zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            problem = f"CRC mismatch at byte {pos}"
        elif kind not in (FULL, FIRST, MIDDLE, LAST):
            problem = f"unknown fragment type {kind} at byte {pos}"
        elif kind in (FULL, FIRST) and in_record:
            problem = f"a new record starts at byte {pos} before the one at byte {record_start} has its LAST fragment"
        elif kind in (MIDDLE, LAST) and not in_record:
            problem = f"a {'MIDDLE' if kind == MIDDLE else 'LAST'} fragment at byte {pos} follows no FIRST fragment"
        if problem:
            if strict:
                raise WandbFileError(f"{path}: {problem}")
            return
        if kind == FULL:
            yield bytes(payload)
        elif kind == FIRST:
            pending, in_record, record_start = bytearray(payload), True, pos
        else:
            pending += payload
            if kind == LAST:
                in_record = False
                yield bytes(pending)
        pos = end


def iter_records(path: str | os.PathLike[str], *, strict: bool = True) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` in the file."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_record_bytes(path, strict=strict):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _value(item: Any) -> Any:
    try:
        return json.loads(item.value_json)
    except ValueError:
        return item.value_json


@dataclass
class OfflineRun:
    """What one offline run logged."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    def column(self, key: str) -> list[Any]:
        """The values of ``key`` over history rows that have it, in order."""
        return [row[key] for row in self.history if key in row]


def read_offline_run(path: str | os.PathLike[str], *, strict: bool = True) -> OfflineRun:
    """Parse a ``run-<id>.wandb`` file (or a run directory holding one) into an :class:`OfflineRun`.

    Strict by default: a file read before its writer finished must fail, not lose its last rows
    (``strict=False`` reads what a killed run left).
    """
    path = Path(path)
    if path.is_dir():
        path = find_run_file(path)
    run = OfflineRun(path=path)
    for record in iter_records(path, strict=strict):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): _value(item) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.tags = list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    # Summary defaults to the last value of each history key (what W&B shows), unless set explicitly.
    derived: dict[str, Any] = {}
    for row in run.history:
        derived.update({k: v for k, v in row.items() if not k.startswith("_")})
    run.summary = {**derived, **run.summary}
    return run


def find_run_file(directory: str | os.PathLike[str]) -> Path:
    """The single ``run-*.wandb`` file under ``directory`` (searched recursively)."""
    files = sorted(Path(directory).rglob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{directory}: expected one run-*.wandb file, found {len(files)}: {[str(f) for f in files[:5]]}")
    return files[0]


__all__ = ["OfflineRun", "WandbFileError", "find_run_file", "iter_record_bytes", "iter_records", "read_offline_run"]
