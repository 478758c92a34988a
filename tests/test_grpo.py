"""``task=grpo``: TRL's GRPOTrainer on a split model through run.py, and its verifiable rewards.

Two kinds of run. ``test_two_grpo_steps_through_run_py`` uses ``debug=quick`` donors (barely trained:
every reward is zero, so the advantages and the update are zero): the plumbing (logs, CSV, W&B, export,
the KL reference). ``test_grpo_raises_the_reward_it_is_given`` starts from the default split of the
shipped donors, whose completions of held-out headers parse about one time in four, so a group's rewards differ:
there GRPO must raise the reward (and lower it when the reward's sign is flipped), train exactly what
``finetune.trainable`` names and leave the rest as it was. Needs trl (the ``rl`` extra;
``scripts/setup.sh --dev`` installs it).

Injected bugs this file catches (each run once against it):

- the reward's sign flipped inside ``train_grpo`` (``reward_weights`` negated): the "rises" case falls;
- GRPO's learning rate at 0 (``learning_rate=0.0`` in ``train_grpo``): nothing trainable changes, the reward does not rise;
- a frozen part trained (``select_trainable`` of every parameter): the frozen tensors change.
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


def stdlib_source(cache: Path) -> list[str]:
    """The ``stdlib_source`` documents as run.py's ``task=grpo`` reads them (cached in the session's donor cache)."""
    from splitllama.embedded import load_stdlib_corpus

    return load_stdlib_corpus(cache, 80, corpus="stdlib_source", progress=False)


def test_every_held_out_header_earns_both_rewards_with_its_real_completion(embedded_cache: Path) -> None:
    """The rewards are reachable: the real rest of each held-out header gets 1.0 and 1.0."""
    documents = stdlib_source(embedded_cache)
    train, evaluation = held_out_header_prompts(documents, 0.05, 64, 16, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
    prompts, completions = [p.prompt for p in train], [p.answer for p in train]
    assert header_parses(prompts, completions) == [1.0] * len(prompts)
    assert parameter_match(prompts, completions, [p.parameters for p in train]) == [1.0] * len(prompts)
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError, match=r"task.grpo.prompts=100000 \+ task.grpo.eval_prompts=16: the held-out documents hold only "
                                             r"\d+ one-line function headers; give task.grpo.prompts \+ task.grpo.eval_prompts <= \d+"):
        held_out_header_prompts(documents, 0.05, 100_000, 16, seed=0)


def test_two_grpo_steps_through_run_py(run_py: RunPy, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_py.inline(*TWO_STEPS, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    printed = capfd.readouterr().out
    results = read_results(tmp_path)
    assert results["status"] == "ok" and results["task"] == "grpo"
    metrics = results["metrics"]
    assert metrics["steps"] == 2
    assert metrics["kl_last"] is not None and metrics["eval_reward_before"] is not None and metrics["eval_reward_after"] is not None
    assert metrics["eval_header_parses_before"] is not None and metrics["eval_parameter_match_after"] is not None

    # what the run says: its plan before it starts (steps, samples, evaluations, an estimate), a progress line after the
    # first step and at the last, a line per evaluation, and one summary last; TRL's raw log rows are not printed
    assert "grpo step 1/2" in printed  # the progress reaches stdout too (Hydra's console handler)
    assert not [line for line in printed.splitlines() if line.lstrip().startswith("{'")], printed[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert ("grpo: 2 steps (trainer.max_steps), each 2 of 8 held-out function headers x 4 completions of up to 8 tokens; "
            "2 evaluations on 4 other held-out headers") in log
    assert "Estimate: about " in log
    progress = [line.split(" - ", 1)[1] for line in log.splitlines() if " - grpo step " in line]
    assert [p.split(":")[0] for p in progress] == ["grpo step 1/2 (50%)", "grpo step 2/2 (100%)"], progress
    assert "left (ETA" in progress[0] and "reward " in progress[0] and "header parses " in progress[0]
    assert log.count("grpo evaluation at step ") == 2
    last = log.strip().splitlines()[-1].split(" - ", 1)[1]
    assert last == (f"grpo: held-out reward {metrics['eval_reward_before']:.3f} -> {metrics['eval_reward_after']:.3f}, headers that "
                    f"parse {metrics['eval_header_parses_before']:.0%} -> {metrics['eval_header_parses_after']:.0%}, parameter match "
                    f"{metrics['eval_parameter_match_before']:.2f} -> {metrics['eval_parameter_match_after']:.2f} over 2 steps in "
                    f"{results['timings']['grpo_s'] / 60:.1f} min (KL to the start {metrics['kl_last']:.3g}); {tmp_path.resolve()}/results.json, "
                    f"the model in {results['paths']['export_dir']}"), last
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
    # what finetune=last leaves out (the adapter and the large donor's layers train: here with zero advantages)
    frozen = {n: t for n, t in start.state_dict().items() if not n.startswith(TRAINED_BY_LAST)}
    assert len(frozen) > 10 and all(exported.state_dict()[n].equal(t) for n, t in frozen.items()), "a frozen part changed"


# ------------------------------------------------------------------ GRPO learns
#: the tensors ``finetune=last`` (the default ``finetune.trainable: [adapter, last]``) trains, by their names in the split model
TRAINED_BY_LAST = ("model.adapter.", "model.layers_last.")

#: three GRPO steps of 4 prompts x 4 completions of 8 tokens on the shipped donors' default split, from a saved model
#: (task.model_dir), evaluated before and after on 16 other held-out prompts x 4 samples; the KL term off (beta=0), so
#: only the reward moves the policy; a constant learning rate. ``adapter.init=random``: the model is loaded, not
#: assembled, so no calibration data is needed (setup.load builds it for lstsq even with task.model_dir).
LEARNING_RUN = ["task=grpo", "logger=csv", "eval.references=false", "adapter.init=random", "trainer.max_steps=3",
                "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "task.grpo.beta=0", "task.grpo.prompts=64",
                "task.grpo.eval_prompts=16", "task.grpo.eval_every=3", "task.grpo.prompts_per_step=4", "task.grpo.num_generations=4",
                "task.grpo.max_completion_length=8"]


@pytest.fixture(scope="module")
def varied_start(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default split of the shipped donors (all 4 small layers, least-squares adapter on 16 blocks of training
    files, the last 3 large layers), saved. Its completions of held-out headers parse about one time in four (0.27),
    so the rewards within a group differ and GRPO has an advantage to follow (on ``debug=quick`` donors all are 0)."""
    import torch
    from transformers import AutoTokenizer

    from splitllama import build_split_model
    from splitllama.data import in_validation
    from splitllama.embedded import SHIPPED_DONORS

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DONORS / "small")
    ids: list[int] = []
    for document in (d for d in stdlib_source(embedded_cache) if not in_validation(d, 0.05)):
        ids += tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= 16 * 128:
            break
    model = build_split_model(SHIPPED_DONORS / "small", SHIPPED_DONORS / "large", 4, 3, adapter="linear", adapter_init="lstsq",
                              calibration=torch.tensor(ids[: 16 * 128]).view(16, 128))
    out = tmp_path_factory.mktemp("grpo_start") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parse_rate(history: list[dict], when: str) -> float:
    """The share of evaluation completions whose header parses (TRL's mean of the ``header_parses`` reward, unweighted)."""
    rows = [r for r in history if "eval_rewards/header_parses/mean" in r]
    assert len(rows) == 2, history  # before (step 0) and after the last step
    return rows[0 if when == "before" else -1]["eval_rewards/header_parses/mean"]


@pytest.mark.parametrize("sign", [1, -1], ids=["reward", "reward flipped"])
def test_grpo_raises_the_reward_it_is_given(run_py: RunPy, varied_start: Path, tmp_path: Path, sign: int) -> None:
    """Before: GRPO's only run was on donors whose rewards were all 0, where nothing can change, and its "frozen
    part changed" check counted the trained large layers as frozen. From a model whose rewards vary, 3 steps
    raise the share of held-out headers that parse (on 64 samples); with the rewards' weights at -1
    (``task.grpo.reward_weights=[-1,-1]``) the same steps drive it down. The adapter and the last layers
    (``finetune=last``) change, every other tensor stays bit for bit."""
    from safetensors.torch import load_file

    run_py.inline(*LEARNING_RUN, f"task.model_dir={varied_start}", f"task.grpo.reward_weights=[{sign},{sign}]",
                  f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "ok" and results["metrics"]["steps"] == 3
    before, after = parse_rate(results["grpo"]["history"], "before"), parse_rate(results["grpo"]["history"], "after")
    assert 0.15 < before < 0.85, before  # rewards that vary: something to learn from, either way
    # measured on 2 CPU cores: 0.27 -> 0.80 (reward), 0.27 -> 0.0 (flipped); lr 0 leaves it within sampling noise
    moved = (after - before) * sign
    assert moved >= 0.15, (f"task.grpo.reward_weights=[{sign},{sign}]: the share of held-out headers that parse went {before:.3f} -> "
                           f"{after:.3f}, not {'up' if sign > 0 else 'down'} by 0.15")

    start = load_file(varied_start / "model.safetensors")
    end = load_file(Path(results["paths"]["export_dir"]) / "model.safetensors")
    assert start.keys() == end.keys()
    trained = sorted(n for n in start if n.startswith(TRAINED_BY_LAST))
    assert results["trainable"]["tensors"] == len(trained) == 2 + 9 * 3
    unchanged = sorted(n for n in trained if start[n].equal(end[n]))
    assert unchanged == [], f"trainable tensors GRPO did not change: {unchanged}"
    changed = sorted(n for n in start if not n.startswith(TRAINED_BY_LAST) and not start[n].equal(end[n]))
    assert changed == [], f"frozen tensors (not in finetune.trainable) that changed: {changed}"


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
