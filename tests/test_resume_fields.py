"""A resume is the same run: every setting that decides the trained result, changed on a resume, is refused
naming it (``splitllama.run.resume``).

One real short training run (``run.py debug=quick``, stopped after its first step, in this process) makes
the checkpoint. Then each deciding field is changed in turn and the resume is checked as ``run.py`` checks
it (:func:`resume_checks`: the config's entries before donors and data are loaded, then the donors' and the
data's content), in this process: a change of any field must be refused, and the error must name that field.
The fields: each key of ``TRAINED_RESULT_KEYS`` (a test fails when a key has no case here), the resolved layer
lists, a donor with one tensor nudged (a copy elsewhere is the same donor), other documents in ``data.files``
(a copy elsewhere is the same data), and another tokenizer. And every other key of the config is classified
(:data:`NOT_DECIDING`, with why), so a key added to the config is either checked on resume or said not to
decide the result.

Injected bugs this file catches (each run once against it; the report of issue 33 has the failing lines):
``"seed"``, ``"adapter.kind"`` or ``"objective.kind"`` left out of ``TRAINED_RESULT_KEYS``; the donors'
fingerprints left out of ``trained_result``; the documents' fingerprint left out; ``check_resume`` comparing
only the keys of its first call (before donors and data are known).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from splitllama.backend.spec import BackendSpec
from splitllama.errors import RunConfigError
from splitllama.results import RunRecord
from splitllama.run.resume import TRAINED_RESULT_KEYS
from splitllama.training.module import OptimSettings
from splitllama.training.objectives import Objective
from tests.conftest import REPO, RunPy, compose_run_config
from tests.test_learning import templated_functions

#: the run whose checkpoint is resumed: debug=quick on explicit donor directories and a data file
BASE = ("debug=quick", "logger=none", "eval.references=false", "data=files")


class OtherOptimSettings(OptimSettings):
    """One's own optimiser settings class (``optim._target_``): another run, whatever it does."""


class OtherObjective(Objective):
    """One's own objective class (``objective._target_``)."""


class OtherBackendSpec(BackendSpec):
    """One's own backend class (``backend._target_``)."""


def other_datamodule(**kwargs: Any) -> Any:
    """One's own data module factory (``data._target_``)."""
    from splitllama.run.data import text_datamodule

    return text_datamodule(**kwargs)


#: each deciding field, and the overrides (on top of :data:`BASE` and the run's donors and data) that change it on a
#: resume; ``{...}`` names a path of :class:`Given`
FIELD_CHANGES: dict[str, tuple[str, ...]] = {
    "adapter.kind": ("adapter=mlp",),
    "adapter.init": ("adapter.init=random",),
    "adapter.hidden_size": ("adapter=mlp", "adapter.hidden_size=64"),
    "adapter.rank": ("adapter=lowrank", "adapter.rank=8"),
    "adapter.bias": ("adapter.bias=false",),
    "adapter.checkpoint": ("adapter.checkpoint={adapter_file}",),
    "adapter.calibration_blocks": ("adapter.calibration_blocks=8",),
    "finetune.trainable": ("finetune=adapter",),
    "finetune.lora": ("finetune.lora.enabled=true",),
    "objective._target_": (f"objective._target_={__name__}.OtherObjective",),
    "objective.kind": ("objective=distill",),
    "objective.lm_weight": ("objective.lm_weight=0.5",),
    "objective.distill_weight": ("objective.distill_weight=0.5",),
    "objective.temperature": ("objective.temperature=2.0",),
    "data._target_": (f"data._target_={__name__}.other_datamodule",),
    "data.source": ("data.source=stdlib_docs",),
    "data.text_field": ("data.text_field=body",),
    "data.min_doc_chars": ("data.min_doc_chars=100",),
    "data.seq_len": ("data.seq_len=32",),
    "data.batch_size": ("data.batch_size=2",),
    "data.val_fraction": ("data.val_fraction=0.1",),
    "data.max_val_blocks": ("data.max_val_blocks=8",),
    "seed": ("seed=1",),
    "trainer.max_steps": ("trainer.max_steps=12",),
    "trainer.accumulate_grad_batches": ("trainer.accumulate_grad_batches=2",),
    "trainer.gradient_clip_val": ("trainer.gradient_clip_val=0.5",),
    "trainer.precision": ("trainer.precision=bf16-mixed",),
    "trainer.overfit_batches": ("trainer.overfit_batches=1",),
    "optim._target_": (f"optim._target_={__name__}.OtherOptimSettings",),
    "optim.lr": ("optim.lr=0.002",),
    "optim.weight_decay": ("optim.weight_decay=0.1",),
    "optim.betas": ("optim.betas=[0.9,0.99]",),
    "optim.eps": ("optim.eps=1e-6",),
    "optim.warmup_steps": ("optim.warmup_steps=1",),
    "optim.min_lr_ratio": ("optim.min_lr_ratio=0.5",),
    "backend._target_": (f"backend._target_={__name__}.OtherBackendSpec",),
    "backend.name": ("backend=megatron",),
    "backend.dtype": ("backend.dtype=bfloat16",),
    "parallel.devices": ("parallel.devices=2",),
    "parallel.num_nodes": ("parallel.num_nodes=2",),
    "parallel.fsdp_param_dtype": ("parallel.fsdp_param_dtype=bfloat16",),
    "callbacks.extra": ("+callbacks.extra.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",),
    # resolved by the run, not config keys
    "layers.list8": ("layers.n8=1",),
    "layers.list70": ("layers.n70=2",),
    "donors.small": ("donors.path8b={nudged_small}",),
    "donors.large": ("donors.path70b={nudged_large}",),
    "data.documents": ("data.files=[{other_corpus}]",),
    "data.tokenizer": ("donors.path8b={lowercasing_small}", "donors.path70b={lowercasing_large}"),
}

#: what a resume may change, by key (a key, or every key under it), and why it does not decide the trained result
NOT_DECIDING: dict[str, str] = {
    "task": "what the run does with the model besides training it (evaluation first, export, generation, GRPO), and how "
            "it stops (stop_after_steps) or is extended (extend, checked by check_resume); another task may not resume a "
            "training run at all",
    "donors": "where the donors come from and what is checked about them; their content is donors.small / donors.large "
              "(weights fingerprints; the embedded recipe builds other weights), default_n8/n70 and default_lr resolve "
              "into layers.list8/list70 and optim.lr",
    "layers": "resolved into layers.list8 / layers.list70",
    "backend.attn_implementation": "the same attention, another kernel",
    "backend.gradient_checkpointing": "recomputes activations: the same gradients",
    "backend.tp": "the same model split over devices", "backend.pp": "the same model split over devices",
    "backend.sp": "the same model split over devices",
    "backend.micro_batch_size": "the same batch in smaller pieces (gradients summed)",
    "backend.options": "options of how the backend runs the same model (gradient checkpointing, FSDP wrapping)",
    "parallel.name": "the layout's name; its sizes are the keys below and backend.tp/pp",
    "parallel.accelerator": "the same computation on another device",
    "parallel.strategy": "how Lightning runs the ranks", "parallel.fsdp_sharding_strategy": "how FSDP shards the same model",
    "parallel.fsdp_wrap_decoder_layers": "how FSDP groups the same model", "parallel.timeout_s": "a collective's time-out",
    "parallel.cpu_threads": "threads of the same computation",
    "data.name": "the option's name; its content is data.source and data.documents",
    "data.files": "where the files lie; their content is data.documents",
    "data.val_batch_size": "the validation loss is a mean over tokens: any batch size gives it",
    "data.num_workers": "loader processes",
    "trainer.val_check_interval": "when validation runs", "trainer.log_every_n_steps": "when metrics are logged",
    "trainer.progress_every_n_steps": "when a progress line is logged",
    "trainer.checkpoint_every_n_steps": "when checkpoints are written",
    "trainer.fast_dev_run": "a smoke run of one batch, which writes no checkpoint to resume",
    "trainer.num_sanity_val_steps": "a check before training", "trainer.enable_progress_bar": "display",
    "trainer.deterministic": "the same algorithms, deterministic kernels", "trainer.hang_timeout_s": "a watchdog",
    "trainer.nonfinite_patience": "when a run whose loss turned non-finite ends as diverged; a run whose loss stays finite "
                                  "trains the same",
    "logger": "where metrics go", "callbacks.model_checkpoint": "when and where checkpoints are written",
    "callbacks.graceful_stop": "how a run stops on a signal", "paths": "where outputs lie",
    "sweep": "what a sweeper optimises", "eval": "what is scored after training (donors' references, downstream tasks)",
    "ckpt_path": "what is resumed",
}


@dataclass
class Given:
    """The trained run and the files its resumes are pointed at."""

    run_dir: Path
    cache: Path
    small: Path
    large: Path
    corpus: Path
    nudged_small: Path
    nudged_large: Path
    lowercasing_small: Path
    lowercasing_large: Path
    other_corpus: Path
    corpus_copy: Path
    small_copy: Path
    large_copy: Path
    adapter_file: Path

    def run_overrides(self) -> tuple[str, ...]:
        return (f"donors.path8b={self.small}", f"donors.path70b={self.large}", f"data.files=[{self.corpus}]")


def nudged_copy(donor: Path, out: Path) -> Path:
    """A copy of ``donor`` with one weight changed by 1e-2 (its last layer's down projection, first element)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(donor, out)
    weights = out / "model.safetensors"
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    name = max((n for n in state if n.endswith("mlp.down_proj.weight")), key=lambda n: int(n.split(".")[2]))
    state[name][0, 0] += 1e-2
    save_file(state, weights, metadata=metadata)
    return out


def lowercasing_copy(donor: Path, out: Path) -> Path:
    """A copy of ``donor`` whose tokenizer lowercases text first: the same weights, other token ids for the same text."""
    shutil.copytree(donor, out)
    for name in ("tokenizer.json",):
        pipeline = json.loads((out / name).read_text())
        pipeline["normalizer"] = {"type": "Lowercase"}
        (out / name).write_text(json.dumps(pipeline))
    return out


@pytest.fixture(scope="module")
def given(run_py: RunPy, embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Given:
    """The debug=quick donors copied to their own directories, a corpus file, a run stopped after its first step
    (``checkpoints/last.ckpt``), and the changed and unchanged copies its resumes are pointed at."""
    from splitllama.run.donors import resolve_donors

    root = tmp_path_factory.mktemp("resume_fields")
    built = resolve_donors(compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}"))
    small, large = Path(shutil.copytree(built.path8b, root / "small")), Path(shutil.copytree(built.path70b, root / "large"))
    corpus = templated_functions(root / "functions.jsonl")
    other = root / "other.jsonl"
    rows = corpus.read_text().splitlines()
    other.write_text("\n".join([json.dumps({"text": json.loads(rows[0])["text"] + "\n# one more line\n"}), *rows[1:]]) + "\n")
    from safetensors.torch import save_file

    adapter_file = root / "adapter.safetensors"
    save_file({"weight": torch.zeros(256, 128), "bias": torch.zeros(256)}, adapter_file)
    g = Given(run_dir=root / "run", cache=embedded_cache, small=small, large=large, corpus=corpus,
              nudged_small=nudged_copy(small, root / "nudged_small"), nudged_large=nudged_copy(large, root / "nudged_large"),
              lowercasing_small=lowercasing_copy(small, root / "lower_small"), lowercasing_large=lowercasing_copy(large, root / "lower_large"),
              other_corpus=other, corpus_copy=Path(shutil.copy2(corpus, root / "copy.jsonl")),
              small_copy=Path(shutil.copytree(small, root / "small_copy")), large_copy=Path(shutil.copytree(large, root / "large_copy")),
              adapter_file=adapter_file)
    run_py.inline(*BASE, *g.run_overrides(), "task.stop_after_steps=1", f"hydra.run.dir={g.run_dir}", cwd=root)
    assert (g.run_dir / "checkpoints" / "last.ckpt").is_file()
    return g


@functools.cache
def checks_record(run_dir: Path) -> RunRecord:
    """The run record the checks write into (never written out; one for all, as making one asks git for the commit)."""
    return RunRecord(run_dir, task="train", config={}, repo_dir=REPO)


def resume_checks(g: Given, *overrides: str) -> dict[str, Any]:
    """What ``run.py ckpt_path=last <overrides>`` checks of a resume before it trains (run.py's ``train``, in this
    process): the config's entries before the donors and data are loaded, then all of them. Returns results.json's
    ``resume`` entry; raises the refusal."""
    from splitllama.run import resume, setup
    from splitllama.run.trainer import seed_everything

    cfg = compose_run_config(*BASE, *g.run_overrides(), *overrides, "ckpt_path=last", f"paths.output_dir={g.run_dir}", f"paths.root_dir={REPO}",
                             f"paths.cache_dir={g.cache}")
    record = checks_record(g.run_dir.parent / "checks")
    run = setup.check(cfg, record)
    ckpt_path = resume.checkpoint_to_resume(cfg)
    assert ckpt_path == str(g.run_dir / "checkpoints" / "last.ckpt")
    resume.check_resume(cfg, ckpt_path, resume.trained_result(cfg, run.split), record)
    seed_everything(cfg.seed)
    run = setup.load(cfg, record, run, stage="fit")
    resume.check_resume(cfg, ckpt_path, resume.trained_result(cfg, run.split, run.donors, run.data), record)
    return record.data["resume"]


def test_every_trained_result_key_has_a_case() -> None:
    """A key added to ``TRAINED_RESULT_KEYS`` gets a case here; each case is a deciding field."""
    resolved = {"layers.list8", "layers.list70", "donors.small", "donors.large", "data.documents", "data.tokenizer"}
    assert set(TRAINED_RESULT_KEYS) | resolved == set(FIELD_CHANGES)


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of the composed config, dotted (a list or an empty node is one key)."""
    if isinstance(node, dict) and node:
        return [key for name, value in node.items() for key in config_keys(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")]


def test_every_config_key_decides_the_result_or_says_why_not() -> None:
    """Each key of a training run's config is checked on resume (``TRAINED_RESULT_KEYS``, or under one of them) or
    listed in :data:`NOT_DECIDING` with its reason: a new key must be classified before it can slip past a resume."""
    from splitllama.run.settings import config_dict

    cfg = compose_run_config("debug=quick", "paths.output_dir=/tmp/x", "paths.root_dir=/tmp")
    decided = set(TRAINED_RESULT_KEYS)
    unclassified = [key for key in config_keys(config_dict(cfg))
                    if not any(key == k or key.startswith(k + ".") for k in (*decided, *NOT_DECIDING))]
    assert unclassified == []
    both = sorted(k for k in NOT_DECIDING if any(k == d or d.startswith(k + ".") or k.startswith(d + ".") for d in decided))
    assert both == [], f"keys both checked and said not to decide: {both}"


def test_an_unchanged_resume_is_accepted(given: Given) -> None:
    """The control: the same settings (the donors and the data copied elsewhere too) continue the run."""
    assert resume_checks(given)["checked"] is True
    moved = (f"donors.path8b={given.small_copy}", f"donors.path70b={given.large_copy}", f"data.files=[{given.corpus_copy}]")
    assert resume_checks(given, *moved)["checked"] is True
    extended = resume_checks(given, "trainer.max_steps=12", "task.extend=true")
    assert extended["extended"] == {"trainer.max_steps": [8, 12]}


@pytest.mark.parametrize("field", list(FIELD_CHANGES))
def test_a_resume_that_changes_a_deciding_field_is_refused_naming_it(given: Given, field: str) -> None:
    """Before: only optim.lr, layers.list70 and trainer.max_steps were tried on a resume; a resume that ignored a
    changed donor, the data, the seed, the adapter or the objective would have passed. Each field is tried now."""
    overrides = [o.format(**{k: v for k, v in vars(given).items()}) for o in FIELD_CHANGES[field]]
    with pytest.raises(RunConfigError) as refused:
        resume_checks(given, *overrides)
    message = str(refused.value)
    assert "was trained with other settings, and a resume continues the same run: " in message, message
    named = re.findall(r"(?:run: |; )([\w.]+): ", message)
    assert field in named, f"{' '.join(overrides)}: the refusal names {named}, not {field}: {message}"


def test_the_checkpoint_records_every_field(given: Given) -> None:
    """What the checks compare against is in the checkpoint: every field, with the values of the run."""
    saved = torch.load(given.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["splitllama_trained_result"]
    assert set(saved) == set(FIELD_CHANGES)
    assert saved["layers.list70"] == [4, 5, 6, 7] and saved["seed"] == 0 and len(saved["donors.small"]) == 16


def test_run_py_refuses_other_donors_and_data_before_training(run_py: RunPy, given: Given) -> None:
    """The same refusal from run.py itself (in this process), for the fields known only once the donors and the data
    are loaded: nudged donors and other documents are named, before any training step, and the checkpoint stays."""
    from splitllama.results import read_results

    last = given.run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    changed = (f"donors.path8b={given.nudged_small}", f"donors.path70b={given.nudged_large}", f"data.files=[{given.other_corpus}]")
    ended = run_py.inline(*BASE, *given.run_overrides(), *changed, "ckpt_path=last", f"hydra.run.dir={given.run_dir}",
                          cwd=given.run_dir.parent, ok=False)
    assert ended.returncode == 1 and "was trained with other settings, and a resume continues the same run: " in ended.message, ended
    named = re.findall(r"(?:run: |; )([\w.]+): ", ended.message)
    assert named == ["donors.small", "donors.large", "data.documents"], ended.message
    results = read_results(given.run_dir)
    assert "failed" in {results["status"], *(a["status"] for a in results.get("attempts", []))} and last.read_bytes() == before
