"""``task=grpo``: TRL's GRPOTrainer on a split model through run.py, and its verifiable rewards.

The run uses ``debug=quick`` donors (barely trained: their rewards are zero, so this checks the
plumbing, not learning; the reward curve on the default donors is in the README). Needs trl
(the ``rl`` extra; ``scripts/setup.sh --dev`` installs it).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from splitllama.results import read_results
from splitllama.training.grpo import header_parameters, header_parses, header_prompts, held_out_header_prompts, parameter_match
from tests.conftest import RunPy
from tests.wandb_offline import find_run_file, read_offline_run

#: two GRPO steps of 2 prompts x 4 completions, evaluated before and after on 4 prompts
TWO_STEPS = ["debug=quick", "task=grpo", "trainer.max_steps=2", "optim.warmup_steps=0", "task.grpo.prompts=8",
             "task.grpo.eval_prompts=4", "task.grpo.eval_every=2", "task.grpo.prompts_per_step=2",
             "task.grpo.num_generations=4", "task.grpo.max_completion_length=8"]

SOURCE = '''
class Parser:
    def parse(self, text, *, strict=False):
        return text
    def reset(self,
              keep=True):
        pass

async def fetch(url, /, timeout=None, **options): ...
def _helper(): pass
'''


def test_header_prompts_are_the_one_line_headers() -> None:
    prompts = header_prompts([SOURCE])
    assert [(p.prompt, p.answer, p.parameters) for p in prompts] == [
        ("    def parse(", "self, text, *, strict=False):", ("self", "text", "strict")),  # reset's two-line header is left out
        ("async def fetch(", "url, /, timeout=None, **options): ...", ("url", "timeout", "options")),
        ("def _helper(", "): pass", ()),
    ]


def test_rewards_of_completions() -> None:
    prompts = ["    def parse("] * 5
    completions = ["self, text, *, strict=False):\n        return", "self, text):", "self, text", "x y):", "self, b, c, d):"]
    assert header_parses(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    real = [("self", "text", "strict")] * 5
    assert parameter_match(prompts, completions, real) == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 1 / 6])
    assert header_parameters("def f(a, b=1, *c, d, **e):") == ("a", "b", "d", "c", "e")
    assert header_parameters("x = 1") is None


def test_every_held_out_header_earns_both_rewards_with_its_real_completion(tmp_path: Path) -> None:
    """The rewards are reachable: the real rest of each held-out header gets 1.0 and 1.0."""
    from splitllama.embedded import collect_stdlib_source

    documents = collect_stdlib_source(progress=False)
    train, evaluation = held_out_header_prompts(documents, 0.05, 64, 16, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
    prompts, completions = [p.prompt for p in train], [p.answer for p in train]
    assert header_parses(prompts, completions) == [1.0] * len(prompts)
    assert parameter_match(prompts, completions, [p.parameters for p in train]) == [1.0] * len(prompts)
    with pytest.raises(ValueError, match=r"task.grpo.prompts=100000 \+ task.grpo.eval_prompts=16: the held-out documents hold only"):
        held_out_header_prompts(documents, 0.05, 100_000, 16, seed=0)


def test_two_grpo_steps_through_run_py(run_py: RunPy, tmp_path: Path) -> None:
    run_py.inline(*TWO_STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "ok" and results["task"] == "grpo"
    metrics = results["metrics"]
    assert metrics["steps"] == 2
    assert metrics["kl_last"] is not None and metrics["eval_reward_before"] is not None and metrics["eval_reward_after"] is not None
    history = results["grpo"]["history"]
    train_rows = [r for r in history if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert {"kl", "rewards/header_parses/mean", "rewards/parameter_match/mean", "completions/mean_length"} <= set(train_rows[0])
    # the default finetune=last: the adapter's weight and bias and the 9 tensors of each of the 4 large layers
    assert results["trainable"] == {"parts": ["adapter", "last"], "tensors": 2 + 9 * 4}

    with open(results["paths"]["metrics_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("train/reward")] == ["1", "2"]
    assert [r for r in rows if r.get("train/kl")] and [r for r in rows if r.get("eval/reward")]
    wandb_run = read_offline_run(find_run_file(tmp_path / "wandb"))
    assert len(wandb_run.column("train/reward")) == 2 and len(wandb_run.column("train/kl")) == 2

    from transformers import AutoModelForCausalLM

    import splitllama  # noqa: F401

    exported = AutoModelForCausalLM.from_pretrained(results["paths"]["export_dir"])
    start = AutoModelForCausalLM.from_pretrained(results["paths"]["start_model"])
    assert json.loads((Path(results["paths"]["export_dir"]) / "config.json").read_text())["architectures"] == ["CustomSplitLLamaForCausalLM"]
    frozen = {n: t for n, t in start.state_dict().items() if not n.startswith("model.adapter.")}
    assert all(exported.state_dict()[n].equal(t) for n, t in frozen.items()), "a frozen part changed"


@pytest.mark.parametrize(("override", "named"), [
    ("task.grpo.num_generations=1", "task.grpo.num_generations=1: must be >= 2"),
    ("task.grpo.rewards=[parses]", "task.grpo.rewards=['parses']: 'parses' is not one of header_parses, parameter_match"),
    ("backend=megatron", "task=grpo runs the HF model"),
])
def test_bad_grpo_settings_fail_before_any_work(run_py: RunPy, tmp_path: Path, tensor_reads: list[str], override: str,
                                               named: str) -> None:
    """run.py (in-process) ends with the one-line error naming the setting, before any model, prompt or
    output exists and before any donor tensor is read (test_run.py checks how run.py's process reports such an error)."""
    run_dir = tmp_path / "run"
    ended = run_py.inline("debug=quick", "task=grpo", override, f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert ended.returncode == 1 and ended.message.startswith("error: ") and named in ended.message, ended
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".run_claim", "results.json", "run.log"]
    results = read_results(run_dir)
    assert results["status"] == "failed" and "donors_s" not in results["timings"]  # before the donors were looked at
    assert tensor_reads == []
