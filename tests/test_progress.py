"""How a run says how it goes: the progress bar counts optimizer steps, and a progress line goes through Python
logging (Hydra's run.log, stdout) every ``trainer.progress_every_n_steps`` steps. A real Lightning Trainer on a
tiny torch model, as ``splitllama.run.trainer.make_trainer`` builds it for max_steps-driven runs (``max_epochs=-1``).
The run.py side (run.log of a quick run) is checked in test_run.py (``test_default_run_logs_its_progress_in_run_log``)."""

from __future__ import annotations

import contextlib
import io
import logging
import re

import lightning.pytorch as pl
import pytest
import torch

from splitllama.errors import RunConfigError
from splitllama.training.callbacks import (
    PROGRESS_LINES,
    ProgressLog,
    RichStepProgressBar,
    TQDMStepProgressBar,
    format_duration,
    progress_interval,
)


class TinyLM(pl.LightningModule):
    """A next-token model of one embedding and one linear layer; batches are ``{"input_ids": ...}`` as ours."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = self.head(self.embed(ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # 3 batches an epoch: a run of more steps goes over several epochs, where Lightning's bar restarts
        data = [{"input_ids": torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(i))} for i in range(12)]
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(tmp_path, max_steps: int, callbacks: list, *, progress_bar: bool = False, accumulate: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress_bar, accumulate_grad_batches=accumulate,
                         callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(TinyLM())
    return trainer


@pytest.mark.parametrize("bar", [RichStepProgressBar, TQDMStepProgressBar], ids=["rich", "tqdm"])
def test_the_progress_bar_counts_steps_not_epochs(tmp_path, bar) -> None:
    """Lightning's bar said ``Epoch 0/-2`` (rich: max_epochs - 1 with max_epochs=-1) and counted each epoch's
    batches; ours says ``step 7/7`` over the run, across the epochs (3 batches each) it takes."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        callback = bar()
        if isinstance(callback, RichStepProgressBar):  # rich writes to its console: a file one here
            from rich.console import Console

            callback._console = Console(file=out, force_terminal=False, width=120)
        trainer = fit(tmp_path, 7, [callback], progress_bar=True)
    text = out.getvalue().replace("\r", "\n")
    assert trainer.global_step == 7
    assert "step 7/7" in text, text[-2000:]
    assert "/-2" not in text and "Epoch" not in text, text[-2000:]


def test_a_progress_line_every_n_steps_and_at_the_last(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Every 3 optimizer steps (6 batches each, accumulated by 2) and at step 7, the last; the loss is a
    real number and the time left is given until the last step."""
    with caplog.at_level(logging.INFO, logger="splitllama.training.callbacks"):
        fit(tmp_path, 7, [ProgressLog(3)], accumulate=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [re.match(r"step (\d+)/7 ", line).group(1) for line in lines] == ["3", "6", "7"], lines
    for line in lines:
        assert re.search(r": loss \d+\.\d+, \d+(\.\d)?k? tokens/s, \d+:\d\d elapsed", line), line
    assert "left (ETA " in lines[0] and "left" not in lines[-1]
    assert any("training 7 steps; a progress line every 3 steps" in r.getMessage() for r in caplog.records)


def test_the_progress_interval() -> None:
    # null: about PROGRESS_LINES lines (the default 600-step run: every 60 steps, 10 lines); 0: none
    assert PROGRESS_LINES == 10
    assert progress_interval(None, 600) == 60 and progress_interval(None, 8) == 1 and progress_interval(None, 95) == 10
    assert progress_interval(25, 600) == 25 and progress_interval(0, 600) == 0
    with pytest.raises(RunConfigError, match="trainer.progress_every_n_steps=-1"):
        ProgressLog(-1)
    assert (format_duration(42), format_duration(3 * 3600 + 62)) == ("0:42", "3:01:02")


@pytest.mark.parametrize("bar", [True, False], ids=["bar", "no-bar"])
def test_a_runs_trainer_has_the_step_bar(tmp_path, bar: bool) -> None:
    """run.py's Trainer (``make_trainer``) takes the step-counting bar, not Lightning's own, where the bar is on."""
    from splitllama.run.trainer import make_trainer
    from tests.conftest import compose_run_config

    cfg = compose_run_config("debug=quick", f"trainer.enable_progress_bar={str(bar).lower()}", f"paths.output_dir={tmp_path}")
    trainer = make_trainer(cfg, [], [])
    if bar:
        assert isinstance(trainer.progress_bar_callback, (RichStepProgressBar, TQDMStepProgressBar))
    else:
        assert trainer.progress_bar_callback is None
