"""A stuck run fails with its stacks instead of hanging (``trainer.hang_timeout_s``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitllama.training.callbacks import HangWatchdog

STUCK_RUN = textwrap.dedent("""
    import time
    import torch
    import lightning.pytorch as pl
    from splitllama.training.callbacks import HangWatchdog

    class Stuck(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                time.sleep(120)  # stands in for a collective some rank never joins
            return self.layer(batch).sum()
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[HangWatchdog(3)])
    trainer.fit(Stuck())
    print("finished")
""")


def test_hang_watchdog_dumps_stacks_and_exits(tmp_path: Path) -> None:
    """A training step that never returns: within the timeout the process prints the stuck frame and exits 1."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RUN)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "finished" not in proc.stdout
    assert "Timeout" in proc.stderr and "in training_step" in proc.stderr, proc.stderr[-3000:]


def test_hang_watchdog_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match=r"trainer.hang_timeout_s=0: must be > 0 seconds"):
        HangWatchdog(0)
