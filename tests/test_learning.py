"""Training goes the right way: what makes a split model learn, checked on one short ``run.py`` run.

The quick loop must notice a model that learns backwards or not at all, so these tests are fast (one
in-process ``run.py debug=quick`` run of 8 steps, about 5 s, shared by every test here) and not marked
slow. The ``debug=quick`` donors are barely trained and 8 steps on their own corpus move the validation
loss by less than its batch-to-batch noise (6.702 -> 6.71 at lr 1e-3 or 5e-3, on three seeds). So this
run trains on a corpus that the default split can learn in 8 steps: short templated Python functions
(:func:`templated_functions`, a ``data=files`` JSONL written here), whose held-out documents follow the
same template. There the validation loss falls by 0.46-0.48 nats (seeds 0, 1, 2; lr 1e-3 and 5e-3),
against a spread of 0.01 between seeds: a 0.3-nat fall is asked for.

The classes, and the bugs injected into the source to show each test fails on them (each run once
against this file; the report of issue 33 has the failing lines):

- direction (the optimiser descends): ``return -parts["loss"]`` in ``SplitLlamaLitModule.training_step``;
  ``torch.optim.AdamW(..., maximize=True)`` in ``configure_optimizers``
  -> ``test_training_lowers_the_validation_loss``;
- magnitude (a learning rate that is not 0, on the schedule the config names): ``lr=0.0`` given to AdamW;
  the warmup-cosine multiplier at 0 (``warmup_cosine`` returning 0.0)
  -> ``test_training_lowers_the_validation_loss``, ``test_the_learning_rate_follows_warmup_then_cosine``;
- what trains (``finetune.trainable``, here the default ``[adapter, last]``): the no-decay group (biases,
  norm weights) left out of the optimiser; ``select_trainable`` unfreezing every parameter
  -> ``test_every_trainable_tensor_moves_and_every_frozen_one_stays``.

What makes a resume the same run (a resume that ignores a setting that decides the result) is the
other class of "trains the right thing": ``tests/test_resume_fields.py``.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from splitllama.results import read_results
from tests.conftest import RunPy

#: the debug=quick run these tests share: 8 steps of 4 x 64 tokens, lr 1e-3 (warmup 2, cosine to 0.1x), the default
#: split and finetune (adapter + the last 4 large layers), on :func:`templated_functions`; every checkpoint is kept
#: (steps 4 and 8), the donors' reference scores are off (not what this file checks)
LEARNING_RUN = ("debug=quick", "data=files", "logger=csv", "eval.references=false", "callbacks.model_checkpoint.save_top_k=-1")
#: the least fall of the validation loss over the 8 steps (measured 0.46-0.48, seed-to-seed spread 0.01)
MIN_FALL = 0.3


def templated_functions(path: Path, documents: int = 400, seed: int = 0) -> Path:
    """A ``data=files`` corpus (JSONL, one document a row) of short templated functions, four to a document:
    ``def add_<word>_<n>(x): \"\"\"Return the <word> plus <n>.\"\"\" return x + <n>``. Enough documents for
    validation (5% held out by hash) and 8 training batches; held-out documents share the template, so what
    the training documents teach lowers the validation loss within a few steps."""
    rng = random.Random(seed)
    words = ["number", "value", "count", "total", "index", "size", "length", "offset"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(documents):
            functions = []
            for _ in range(4):
                n, word = rng.randrange(1000), rng.choice(words)
                functions.append(f'def add_{word}_{n}(x):\n    """Return the {word} plus {n}."""\n    return x + {n}\n')
            f.write(json.dumps({"text": "\n".join(functions)}) + "\n")
    return path


@pytest.fixture(scope="module")
def learned(run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of :data:`LEARNING_RUN` on :func:`templated_functions`, run in this process."""
    root = tmp_path_factory.mktemp("learning")
    corpus = templated_functions(root / "functions.jsonl")
    run_dir = root / "run"
    run_py.inline(*LEARNING_RUN, f"data.files=[{corpus}]", f"hydra.run.dir={run_dir}", cwd=root)
    return run_dir


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every CSV row that logged ``key``."""
    with open(read_results(run_dir)["paths"]["metrics_csv"], newline="") as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key) not in (None, "")]


def test_training_lowers_the_validation_loss(learned: Path) -> None:
    """Before: the quick loop's only check of a default run asked that the loss changed, so training by gradient
    ascent (``-loss``, AdamW ``maximize=True``) or at lr 0 passed it. 8 steps must lower the validation loss on
    held-out documents by :data:`MIN_FALL` nats, and the training loss of the last steps must lie below the first's."""
    results = read_results(learned)
    assert results["status"] == "ok" and results["metrics"]["steps"] == 8
    before, after = results["metrics"]["val_loss_before"], results["metrics"]["val_loss"]
    assert after <= before - MIN_FALL, f"validation loss {before:.4f} -> {after:.4f}: fell by {before - after:.4f}, not >= {MIN_FALL}"
    # the validation after step 4 lies between the start and the end: both halves of training went down
    middle = [loss for step, loss in logged(learned, "val/loss") if 0 < step < 7]
    assert len(middle) == 1 and after < middle[0] < before, (before, middle, after)
    train = [loss for _, loss in logged(learned, "train/loss")]
    assert len(train) == 8 and sum(train[-3:]) / 3 < sum(train[:2]) / 2 - 0.2, train


def test_the_learning_rate_follows_warmup_then_cosine(learned: Path) -> None:
    """The learning rate of every step is ``optim.lr`` times the warmup-cosine multiplier of that step (linear warmup
    over ``optim.warmup_steps``, cosine down to ``optim.min_lr_ratio`` at ``trainer.max_steps``; written out here, not
    imported), as logged by the run: a schedule stuck at 0, never stepped or read from another setting shows here."""
    optim = read_results(learned)["config"]["optim"]
    assert optim["lr"] == 1e-3 and optim["warmup_steps"] == 2 and optim["min_lr_ratio"] == 0.1
    rates = logged(learned, "train/lr")
    assert [step for step, _ in rates] == list(range(8))
    # steps 0, 1: 1/2 and 2/2 of the peak; steps 2..7: 0.1 + 0.9 * (1 + cos(pi * (step - 2) / 6)) / 2
    multipliers = [0.5, 1.0, *(0.1 + 0.45 * (1 + math.cos(math.pi * (step - 2) / 6)) for step in range(2, 8))]
    assert [lr for _, lr in rates] == pytest.approx([1e-3 * m for m in multipliers], rel=1e-6)


def split_to_donor(name: str, layers_8: list[int], layers_70: list[int]) -> tuple[str, str]:
    """Which donor tensor a split-model tensor started from (``small`` or ``large``, its name there): the weight
    map written out by hand, not read from ``splitllama.weight_map``."""
    parts = name.split(".")
    if name.startswith("model.layers_first."):
        return "small", ".".join(["model", "layers", str(layers_8[int(parts[2])]), *parts[3:]])
    if name.startswith("model.layers_last."):
        return "large", ".".join(["model", "layers", str(layers_70[int(parts[2])]), *parts[3:]])
    if name == "model.embed_tokens.weight":
        return "small", name
    assert name in ("model.norm.weight", "lm_head.weight"), name
    return "large", name


def test_every_trainable_tensor_moves_and_every_frozen_one_stays(learned: Path) -> None:
    """``finetune=last`` (the default: the adapter and the large donor's layers) trains exactly those: each of their
    tensors changed between the step-4 checkpoint and the export after step 8 (and the large layers differ from the
    donor's), and every other tensor of the export is its donor's, bit for bit."""
    from safetensors.torch import load_file

    results = read_results(learned)
    split = results["split"]
    exported = load_file(Path(results["paths"]["export_dir"]) / "model.safetensors")
    donors = {which: load_file(Path(results["donors"][f"path{key}"]) / "model.safetensors") for which, key in (("small", "8b"), ("large", "70b"))}
    trainable = sorted(n for n in exported if n.startswith(("model.adapter.", "model.layers_last.")))
    frozen_changed = []
    for name in sorted(set(exported) - set(trainable)):
        which, donor_name = split_to_donor(name, split["layers_8"], split["layers_70"])
        if not exported[name].equal(donors[which][donor_name].to(exported[name].dtype)):
            frozen_changed.append(name)
    assert frozen_changed == [], f"frozen tensors (not in finetune.trainable) that training changed: {frozen_changed}"
    assert results["trainable"] == {"parts": ["adapter", "last"], "tensors": len(trainable)} and len(trainable) == 2 + 9 * 4

    step4 = next(p for p in (learned / "checkpoints").glob("*step=4*.ckpt"))
    saved: dict[str, Any] = torch.load(step4, map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(k.removeprefix("model.") for k in saved) == trainable  # a checkpoint holds the trainable tensors only
    still = [n for n in trainable if saved[f"model.{n}"].equal(exported[n])]
    assert still == [], f"trainable tensors that steps 5-8 did not move: {still}"
    same_as_donor = [n for n in trainable if n.startswith("model.layers_last.")
                     and exported[n].equal(donors["large"][split_to_donor(n, split["layers_8"], split["layers_70"])[1]].to(exported[n].dtype))]
    assert same_as_donor == [], f"large-donor layers that training did not move: {same_as_donor}"


def test_debug_overfit_trains_on_one_batch_until_it_is_learnt(run_py: RunPy, tmp_path: Path) -> None:
    """``debug=overfit`` (``trainer.overfit_batches: 1``) must train on one batch again and again, so the training
    loss falls towards 0 if training works. The config holds the setting as a float and Lightning read ``1.0`` as
    100% of the batches: the run trained on the whole stream (training loss 3.75, 3.02, 3.00, 4.38, 4.53, ...
    4.62, 3.87 over 40 steps). With one batch it falls below 0.05 within 16 steps (2.86 at step 4, 0.0004 at step 40)."""
    from splitllama.run.trainer import overfit_batches

    assert overfit_batches(1.0) == 1 and isinstance(overfit_batches(1.0), int) and overfit_batches(0.25) == 0.25
    run_py.inline("debug=overfit", "trainer.max_steps=16", "trainer.val_check_interval=16", "logger=csv",
                  "eval.harness.tasks=[]", "eval.references=false", "trainer.enable_progress_bar=false",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    train = [loss for _, loss in logged(tmp_path / "run", "train/loss")]
    assert len(train) == 16 and train[-1] < 0.05 < train[0], train
