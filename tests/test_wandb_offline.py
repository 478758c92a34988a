"""The offline W&B reader against files written by the real wandb (offline mode, no account)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.wandb_offline import WandbFileError, find_run_file, iter_record_bytes, read_offline_run

BIG = 40_000  # one value larger than a 32 KiB block: the record spans FIRST/MIDDLE/LAST fragments


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(
        project="reader-test", dir=str(root), config={"lr": 0.5, "model": {"n70": 8}}, tags=["a", "b"], group="sweep-1",
        settings=wandb.Settings(silent=True),
    )
    for step in range(3):
        run.log({"train/loss": 1.0 / (step + 1), "nested": {"x": step}}, step=step)
    run.log({"blob": "z" * BIG, "train/loss": 0.125}, step=3)
    run.summary["best"] = 0.1
    run.finish()
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
    with pytest.raises(WandbFileError, match="CRC mismatch|truncated|unknown fragment"):
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
