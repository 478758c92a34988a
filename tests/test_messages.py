"""Every refusal says what to do (issue 32, item 6): it names the setting (the dotted key as a user types it) or
the file, what is allowed, and a way forward that a user can type.

Each case is a bad input as a user gives it to ``run.py``, checked in-process through what run.py checks before any
heavy work (Hydra's composition and :func:`splitllama.run.checks.validate`, :func:`tests.conftest.run_py_checks`), or
through the step that reads the input (the data files, the resume checkpoint, the tokenizer). The expected fragments
are the setting and the way forward; a message that loses either fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import compose_run_config, run_py_checks

QUICK = "debug=quick"

#: (overrides after debug=quick, fragments the message must hold: the setting first, then the way forward);
#: ``{tmp}`` is an empty directory of the test, ``{none}`` a path that does not exist
REFUSED_BY_CHECKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "layer count past the donor": (("layers.n70=999",), ("layers.n70=999:", "0..8")),
    "layer index past the donor": (("layers.list8=[0,99]",), ("layers.list8=[0, 99]:", "layers 0..")),
    "unknown precision": (("trainer.precision=banana",), ("trainer.precision=banana:", "32-true", "bf16-mixed")),
    "no devices": (("parallel.devices=0",), ("parallel.devices=0:", ">= 1", "auto", "parallel=single")),
    "empty device list": (("parallel.devices=[]",), ("parallel.devices=[]:", "[0,1]", "parallel=single")),
    "unknown accelerator": (("parallel.accelerator=banana",), ("parallel.accelerator=banana:", "auto, cpu, gpu")),
    "unknown strategy": (("parallel.strategy=banana",), ("parallel.strategy=banana:", "parallel=single, ddp, fsdp")),
    "no nodes": (("parallel.num_nodes=0",), ("parallel.num_nodes=0:", ">= 1")),
    "files without files": (("data=files",), ("data.files=[]:", ".txt or .jsonl")),
    "negative hang timeout": (("trainer.hang_timeout_s=-1",), ("trainer.hang_timeout_s=-1.0:", "> 0 seconds", "or null")),
    "negative lr": (("optim.lr=-1",), ("optim.lr=-1.0:", "> 0")),
    "zero steps": (("trainer.max_steps=0",), ("trainer.max_steps=0:", ">= 1")),
    "unknown trainable part": (("finetune.trainable=[nonsense]",), ("finetune.trainable=['nonsense']:", "adapter, first, last")),
    "nothing trainable": (("finetune.trainable=[]",), ("finetune.trainable=[]:", "finetune.trainable=[adapter]", "finetune=lora")),
    "added unknown key": (("+foo=1",), ("+foo=1:", "its keys: task, donors")),
    "added misspelt key": (("+trainer.max_step=5",), ("+trainer.max_step=5:", "did you mean trainer.max_steps?")),
    "one donor path": (("donors.path8b={tmp}",), ("donors.path70b=null:", "donors.path70b=/path/to/checkpoint",
                                                  "drop donors.path8b")),
    "donor without config.json": (("donors.path8b={tmp}", "donors.path70b={tmp}"), ("donors.path8b={tmp}:", "no config.json",
                                                                                    "hf download <model> --local-dir <dir>")),
    "donor path that does not exist": (("donors.path8b={none}", "donors.path70b={none}"),
                                       ("donors.path8b={none}: is not a directory", "give donors.path8b=<dir>", "embedded tiny donors")),
    "preset without donor paths": (("donors=llama3_8b_70b",), ("donors.path8b=???:", "hf download meta-llama/Meta-Llama-3-8B")),
    "model_dir that does not exist": (("task=eval", "task.model_dir={none}"), ("task.model_dir={none}: is not a directory",
                                                                              "<run dir>/hf_model", "task=assemble")),
    "model_dir without config.json": (("task=eval", "task.model_dir={tmp}"), ("task.model_dir={tmp}:", "no config.json",
                                                                             "task.model_dir=<run dir>/hf_model")),
    "unknown generate engine": (("task=generate", "task.engine=foo"), ("task.engine=foo:", "vllm, hf")),
    "identity between unequal donors": (("adapter=identity",), ("adapter.kind=identity:", "use linear, mlp or lowrank")),
    "stop after the end": (("task.stop_after_steps=100",), ("task.stop_after_steps=100:", "below trainer.max_steps=8", "or null")),
    "seq_len past the donors": (("data.seq_len=100000",), ("data.seq_len=100000:", "must be <= 2048")),
    "low-rank adapter of rank 0": (("adapter=lowrank", "adapter.rank=0"), ("adapter.rank=0:", "1..")),
    "zero temperature": (("objective=distill", "objective.temperature=0"), ("objective.temperature=0.0:", "> 0")),
}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{none}", str(tmp / "nowhere"))


@pytest.mark.parametrize("case", list(REFUSED_BY_CHECKS))
def test_a_refused_setting_names_itself_and_the_way_forward(case: str, tmp_path: Path) -> None:
    from splitllama.configuration_split_llama import SplitConfigError
    from splitllama.errors import RunConfigError

    overrides, fragments = REFUSED_BY_CHECKS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((RunConfigError, SplitConfigError)) as refused:
        run_py_checks(QUICK, *(_fill(o, empty) for o in overrides))
    message = str(refused.value)
    setting, *forward = (_fill(f, empty) for f in fragments)
    assert message.startswith(setting), f"{case}: the message does not start with the setting {setting!r}: {message}"
    for fragment in forward:
        assert fragment in message, f"{case}: no {fragment!r} (the way forward) in: {message}"


#: Hydra's own refusals of an override (composition): they name the key and what it takes
REFUSED_BY_HYDRA = {
    "unknown adapter file": (("adapter=nonexistent",), ("adapter/nonexistent", "Available options in 'adapter'", "linear")),
    "unknown adapter kind": (("adapter.kind=foo",), ("adapter.kind", "expected one of [linear, mlp, identity, lowrank]")),
    "misspelt key": (("trainer.max_step=5",), ("trainer.max_step", "+trainer.max_step=5")),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_HYDRA))
def test_hydra_refusals_name_the_key_and_what_it_takes(case: str) -> None:
    """Hydra's messages are run.py's for these; the last one's way forward (``+trainer.max_step=5``) is the
    ``added misspelt key`` case above, which names the key meant: the two messages end at a fix, not in a loop."""
    overrides, fragments = REFUSED_BY_HYDRA[case]
    with pytest.raises(Exception) as refused:  # hydra's MissingConfigException / ConfigCompositionException
        compose_run_config(QUICK, *overrides)
    message = f"{refused.value}\n{refused.value.__cause__ or ''}"
    for fragment in fragments:
        assert fragment in message, f"{case}: no {fragment!r} in: {message}"


def test_a_refused_max_steps_is_not_also_warned_about() -> None:
    """Before: ``trainer.max_steps=0`` logged four warnings ("give optim.warmup_steps below 0", ...) whose advice
    cannot be followed, then the refusal."""
    from splitllama.run.settings import setting_warnings

    assert setting_warnings(compose_run_config(QUICK, "trainer.max_steps=0")) == []
    assert setting_warnings(compose_run_config(QUICK, "trainer.max_steps=1"))  # a valid count still warns


def test_valid_device_settings_pass() -> None:
    """The device check refuses only what Lightning's Trainer would (after the donors and data were loaded)."""
    from omegaconf import OmegaConf

    from splitllama.run.settings import _devices_ok

    for ok in (1, 2, -1, "auto", "1", "-1", "0,1", [0], [0, 1], OmegaConf.create({"d": [0, 1]}).d):
        assert _devices_ok(ok), ok
    for bad in (0, -2, [], "0", "", "banana", True, [-1]):
        assert not _devices_ok(bad), bad


# ------------------------------------------------------------------ refused where the input is read
def test_missing_and_empty_data_files_say_what_to_give(tmp_path: Path) -> None:
    from splitllama.data import read_text_files
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError, match=r"^data\.files: .*nowhere\.txt does not exist; list existing \.txt or \.jsonl files in data\.files"):
        read_text_files([str(tmp_path / "nowhere.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(RunConfigError, match=r"^data\.files: .*empty\.txt holds no documents \(an empty file\); write documents into it"):
        read_text_files([str(tmp_path / "empty.txt")])


def test_too_few_documents_for_a_validation_split_say_what_to_change() -> None:
    from splitllama.data.validation import split_documents

    with pytest.raises(ValueError, match=r"^data\.val_fraction=0\.05: 2 documents give 2 for training and 0 for validation; "
                                         r"both need at least one: give more documents \(data\.files\), or a data\.val_fraction above 0\.05"):
        split_documents(["one tiny document", "another"], 0.05)


def test_a_resume_from_nowhere_says_what_to_give(tmp_path: Path) -> None:
    from splitllama.errors import RunConfigError
    from splitllama.run.resume import checkpoint_to_resume

    cfg = compose_run_config(QUICK, f"ckpt_path={tmp_path / 'nowhere'}")
    with pytest.raises(RunConfigError, match=rf"^ckpt_path={re.escape(str(tmp_path / 'nowhere'))}: no checkpoint at .*; give a \.ckpt file or a run "
                                             r"directory that has checkpoints/last\.ckpt"):
        checkpoint_to_resume(cfg)


def test_a_directory_without_a_tokenizer_is_named_by_its_setting(tmp_path: Path) -> None:
    from splitllama.errors import RunConfigError
    from splitllama.run.donors import load_tokenizer

    with pytest.raises(RunConfigError, match=rf"(?s)^donors\.path8b={re.escape(str(tmp_path))}: {re.escape(str(tmp_path))}: cannot load the tokenizer .*copy them from the "
                                             r"model's Hugging Face repository"):
        load_tokenizer(str(tmp_path), f"donors.path8b={tmp_path}")


def test_a_gpu_accelerator_without_a_gpu_is_refused_before_any_work() -> None:
    """``parallel.accelerator=gpu`` where torch sees no CUDA device: one line naming the setting and what to use,
    from the run's first step (was Lightning's MisconfigurationException after donors and data had loaded)."""
    import torch

    from splitllama.errors import RunConfigError
    from splitllama.run.setup import check_accelerator_present

    cfg = compose_run_config("debug=quick", "parallel.accelerator=gpu")
    if torch.cuda.is_available():  # the device machine: the check lets it through
        check_accelerator_present(cfg)
        return
    with pytest.raises(RunConfigError, match=r"^parallel\.accelerator=gpu: .*parallel\.accelerator=auto"):
        check_accelerator_present(cfg)
    check_accelerator_present(compose_run_config("debug=quick", "parallel.accelerator=cpu"))
