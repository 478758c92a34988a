"""The README's commands as a new user copies them: every ``python run.py`` command that needs neither
a GPU, nor checkpoints or files from outside, nor a previous run's output composes and validates on the
default (shipped) donors, and the design card's own command runs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, compose_run_config

#: a command needing any of these is for a GPU, outside checkpoints or data, a previous run, or a cluster
NEEDS_OUTSIDE = ("<", "$D", "donors.path8b=", "hellaswag", "my_tasks/", "parallel=tp2", "parallel=pp2", "parallel.devices=",
                 "backend.tp=", "experiment=slurm", "experiment=megatron_multinode", "...", "ckpt_path=")


SKIP = "<not a shell block>"


def readme_run_commands() -> list[str]:
    """Each ``python run.py ...`` line of the README's code blocks (continuation lines joined, comments dropped)."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:  # a block opens: shell blocks (``` or ```bash) are read, others (```python) skipped
                current = [] if line.strip() in ("```", "```bash") else [SKIP]
            else:
                if current[:1] != [SKIP]:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    commands: list[str] = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            match = re.search(r"(?:^|&& |\.venv/bin/)python run\.py(.*)$", line)
            if match:
                commands.append(("python run.py" + match.group(1)).strip())
    return commands


def overrides_of(command: str) -> list[str]:
    """The job's overrides of a README command; a sweep (``-m``) composes with the first value of each list.
    Hydra's own settings (``hydra.*``, ``hydra/launcher=``) are Hydra's to check when it launches."""
    words = [w for w in shlex.split(command)[2:] if w != "-m"]
    first = [w.split("=", 1)[0] + "=" + w.split("=", 1)[1].split(",")[0] if "=" in w and "[" not in w else w for w in words]
    return [w for w in first if not w.startswith("hydra")]


COMMANDS = [c for c in readme_run_commands() if not any(mark in c for mark in NEEDS_OUTSIDE)]


def test_readme_lists_the_commands_a_user_starts_with() -> None:
    assert "python run.py" in COMMANDS and "python run.py adapter=mlp layers.n70=8" in COMMANDS
    assert len(COMMANDS) >= 12, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes_and_validates_on_the_default_donors(command: str) -> None:
    from splitllama.run.checks import validate

    cfg = compose_run_config(*overrides_of(command))
    split = validate(cfg)  # what run.py does first: a bad value fails here, naming it
    if cfg.donors.name == "tiny" and cfg.donors.path8b is None:
        assert split.num_layers_70 <= 10 and split.config_70b.num_hidden_layers == 10


def test_the_cards_command_runs_on_the_default_donors(run_py, tmp_path: Path) -> None:
    """``python run.py adapter=mlp layers.n70=8`` (the design card's example) on the shipped donors,
    shortened to 2 steps: the large donor has room for 8 layers, and the run ends ok."""
    run_py.inline("adapter=mlp", "layers.n70=8", "trainer.max_steps=2", "trainer.val_check_interval=2", "eval.harness.tasks=[]",
           "data.max_val_blocks=8", "logger=csv", "task.export=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=REPO)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["steps"] == 2
    split = record["split"]
    assert split["layers_70"] == list(range(2, 10)) and split["adapter"] == "mlp", split
