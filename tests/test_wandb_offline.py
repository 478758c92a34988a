"""The offline W&B reader against files written by the real wandb (offline mode, no account), and
against hand-made LevelDB logs that put fragments at the block edges the format has."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from tests.wandb_offline import (
    BLOCK_SIZE, FIRST, FRAGMENT_HEADER, FULL, HEADER, LAST, MIDDLE, WandbFileError, find_run_file, iter_record_bytes,
    read_offline_run,
)

BIG = 40_000  # one value larger than a 32 KiB block: the record spans FIRST/MIDDLE/LAST fragments


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        run = wandb.init(
            project="reader-test", dir=str(root), config={"lr": 0.5, "model": {"n70": 8}}, tags=["a", "b"], group="sweep-1",
            settings=wandb.Settings(silent=True),
        )
        for step in range(3):
            run.log({"train/loss": 1.0 / (step + 1), "nested": {"x": step}}, step=step)
        run.log({"blob": "z" * BIG, "train/loss": 0.125}, step=3)
        run.summary["best"] = 0.1
        run.finish()
        # finish() does not wait for wandb-core to write the last block (see tests/wandb_offline.py):
        # reading now lost the row in that block under load. teardown() waits for the service to exit.
        wandb.teardown()
    return root


def test_reader_recovers_history_summary_and_config(offline_run: Path) -> None:
    run = read_offline_run(find_run_file(offline_run))
    assert run.project == "reader-test" and run.group == "sweep-1" and run.tags == ["a", "b"]
    assert run.config["lr"] == 0.5 and run.config["model"] == {"n70": 8}
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3]
    assert run.column("train/loss") == [1.0, 0.5, 1 / 3, 0.125]
    assert run.column("nested/x") == [0, 1, 2]
    assert run.column("blob") == ["z" * BIG]
    assert run.summary["best"] == 0.1 and run.summary["train/loss"] == 0.125
    assert run.exit_code == 0


def test_damage_is_reported_or_tolerated(offline_run: Path, tmp_path: Path) -> None:
    original = find_run_file(offline_run).read_bytes()
    records = list(iter_record_bytes(find_run_file(offline_run)))

    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0xFF
    damaged = tmp_path / "run-damaged.wandb"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(WandbFileError, match="CRC mismatch|truncated|unknown fragment|runs past"):
        list(iter_record_bytes(damaged))
    partial = list(iter_record_bytes(damaged, strict=False))
    assert 0 < len(partial) < len(records) and partial == records[: len(partial)]

    truncated = tmp_path / "run-truncated.wandb"
    truncated.write_bytes(original[: len(original) - 10])
    assert list(iter_record_bytes(truncated, strict=False)) == records[:-1]

    other = tmp_path / "run-other.wandb"
    other.write_bytes(b"not a wandb file")
    with pytest.raises(WandbFileError, match="not a W&B transaction log"):
        read_offline_run(other)


def fragment(kind: int, payload: bytes) -> bytes:
    """One fragment: CRC-32 of the type byte and payload, length, type, payload."""
    crc = zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
    return struct.pack("<IHB", crc, len(payload), kind) + payload


def leveldb_log(records: list[bytes]) -> bytes:
    """The bytes LevelDB's log writer (and wandb-core's copy of it) produces for ``records``: a
    block tail shorter than a fragment header is zero padding; with exactly a header's room left,
    a record starts with an empty FIRST fragment."""
    out = bytearray(HEADER)
    for record in records:
        rest, first = record, True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < FRAGMENT_HEADER:
                out += bytes(left)
                continue
            chunk, rest = rest[: left - FRAGMENT_HEADER], rest[left - FRAGMENT_HEADER :]
            kind = (FULL if not rest else FIRST) if first else (LAST if not rest else MIDDLE)
            out += fragment(kind, chunk)
            first = False
            if not rest:
                break
    return bytes(out)


def edge_records() -> list[bytes]:
    """Records whose fragments end 3 bytes before a block edge (zero trailer), leave exactly a
    header's room (empty FIRST), end exactly on an edge, and span three blocks."""
    room = BLOCK_SIZE - len(HEADER) - FRAGMENT_HEADER
    return [
        b"a" * (room - 3),  # block 0 ends with a 3-byte zero trailer
        b"b" * (BLOCK_SIZE - 2 * FRAGMENT_HEADER),  # leaves 7 bytes in block 1: the next record's FIRST is empty
        b"c" * 100,  # empty FIRST at the end of block 1, LAST in block 2
        b"d" * (BLOCK_SIZE - 2 * FRAGMENT_HEADER - 100),  # ends exactly at the end of block 2
        b"e" * (2 * BLOCK_SIZE + 5000),  # FIRST, MIDDLE, LAST: blocks 3 to 5
        b"f" * 10,
    ]


def test_fragments_at_block_edges_are_reassembled(tmp_path: Path) -> None:
    records = edge_records()
    data = leveldb_log(records)
    # The file has the edges the records are built for.
    assert data[BLOCK_SIZE - 3 : BLOCK_SIZE] == bytes(3)
    assert struct.unpack_from("<HB", data, 2 * BLOCK_SIZE - FRAGMENT_HEADER + 4) == (0, FIRST)
    assert struct.unpack_from("<B", data, 3 * BLOCK_SIZE + 6) == (FIRST,)
    assert [struct.unpack_from("<B", data, b * BLOCK_SIZE + 6)[0] for b in (4, 5)] == [MIDDLE, LAST]
    path = tmp_path / "run-edges.wandb"
    path.write_bytes(data)
    assert list(iter_record_bytes(path)) == records


def history_record(step: int, blob: str) -> bytes:
    """A serialized history row as wandb logs it."""
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.history.item.add(key="_step", value_json=str(step))
    record.history.item.add(key="blob", value_json=f'"{blob}"')
    return record.SerializeToString()


def test_a_file_cut_at_a_block_edge_inside_a_record_is_reported(tmp_path: Path) -> None:
    """What a reader sees while wandb-core still holds the last block: whole blocks only, the
    last record's FIRST fragment without its LAST. Before the fix this read as a complete run one
    history row short (the flaky lost row of test_reader_recovers_history_summary_and_config)."""
    records = [history_record(0, "a"), history_record(1, "z" * (2 * BLOCK_SIZE + 5000))]
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(leveldb_log(records)[: 2 * BLOCK_SIZE])  # row 1: FIRST and MIDDLE, no LAST
    with pytest.raises(WandbFileError, match=r"ends inside the record that starts at byte \d+ \(no LAST fragment\)"):
        list(iter_record_bytes(cut))
    with pytest.raises(WandbFileError, match="ends inside the record"):
        read_offline_run(cut)
    assert [row["_step"] for row in read_offline_run(cut, strict=False).history] == [0]


def test_fragments_out_of_order_are_reported(tmp_path: Path) -> None:
    cases = {
        "follows no FIRST fragment": HEADER + fragment(LAST, b"x"),
        "before the one at byte 7 has its LAST": HEADER + fragment(FIRST, b"x") + fragment(FULL, b"y"),
        "runs past the end of its 32 KiB block": HEADER + fragment(FULL, b"x" * BLOCK_SIZE),
    }
    for i, (problem, data) in enumerate(cases.items()):
        path = tmp_path / f"run-{i}.wandb"
        path.write_bytes(data)
        with pytest.raises(WandbFileError, match=problem):
            list(iter_record_bytes(path))
