"""The layout moved without breaking its users (issue 34): every ``_target_`` in ``conf/`` resolves, every
public name of the package resolves, and every name users imported from an old path still does, with a
DeprecationWarning naming its new home. The floors themselves are checked by ``tests/test_import_graph.py``."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest

from tests.conftest import REPO

#: the public names of the modules that moved (their ``__all__`` at 2737d2f, before the move), by old module
OLD_PUBLIC_NAMES = {
    "splitllama.training.pipeline": (
        "Donors RunSetup check load check_donor_expectations check_donor_tokenizers check_resume config_dict donor_references "
        "layer_selection load_documents load_tokenizer make_callbacks make_datamodule make_loggers make_module make_strategy "
        "builds_per_rank runs_own_schedule make_trainer export_model model_spec harness_donor_paths prepare_harness run_harness "
        "resolve_ckpt_path resolve_donors run_name saved_model_donors seed_everything text_datamodule trained_result validate "
        "with_built_donors embedded_recipe apply_cpu_threads plain EXPECTED_DONOR_FIELDS CHECKPOINT_RESULT_KEY"),
    "splitllama.training.schema": (
        "TRAINABLE_PARTS AdapterConfig AdapterInit AdapterKind EvalConfig GrpoConfig HarnessEngine RunConfig RunConfigError "
        "SweepConfig SweepObjective TaskName explain_split_error register_configs validate_run_settings"),
    "splitllama.training.data": "documents_fingerprint in_validation pack_documents read_text_files split_documents tokenizer_mapping",
    "splitllama.training.backends": "HFBackend SplitBackend SplitModelSpec lora_target_regex",
    "splitllama.training.backend_spec": "BackendSpec backend_spec",
    "splitllama.training.sharding": "RESHARD_AFTER_FORWARD ShardedStrategy apply_fsdp decoder_layers full_state_dict is_sharded",
}
#: names of the old modules that did not move (no warning)
STAYED = {("splitllama.training.data", n) for n in ("BlockDataset", "ResumableBlockSampler", "SplitTextDataModule")}
STAYED |= {("splitllama.training.errors", "RunConfigError")}


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old_module, name", [(m, n) for m, names in OLD_PUBLIC_NAMES.items() for n in names.split()])
def test_an_old_import_path_still_resolves_with_a_warning_naming_the_new_one(old_module: str, name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(old_module), name)
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning) and f"{old_module}.{name} moved to" in str(w.message)]
    assert moved, f"{old_module}.{name}: no DeprecationWarning naming its new home ({[str(w.message) for w in caught]})"
    new_home = re.search(r"moved to ([\w.]+)\.\w+;", str(moved[0].message)).group(1)
    assert not new_home.startswith(old_module), new_home
    assert getattr(importlib.import_module(new_home), name) is value  # the same object, not a copy


def test_a_name_that_never_existed_is_still_an_attribute_error() -> None:
    for old_module in OLD_PUBLIC_NAMES:
        with pytest.raises(AttributeError, match="no_such_name"):
            getattr(importlib.import_module(old_module), "no_such_name")


def test_names_that_stayed_resolve_without_a_warning() -> None:
    for module, name in sorted(STAYED):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            assert getattr(importlib.import_module(module), name) is not None


def test_every_target_in_conf_resolves_to_its_new_home_without_a_warning() -> None:
    targets = sorted({m.group(1) for path in (REPO / "conf").rglob("*.yaml")
                      for m in re.finditer(r"_target_:\s*([\w.]+)", path.read_text())})
    assert any(t.startswith("splitllama.run.") for t in targets) and len(targets) >= 10, targets
    for target in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # conf/ names the new paths, not the aliases
            assert callable(_resolve(target)), target


def test_every_public_name_of_the_package_resolves() -> None:
    import splitllama

    for name in splitllama.__all__:
        assert getattr(splitllama, name) is not None, name
    import splitllama.embedded as embedded

    for name in embedded.__all__:
        assert getattr(embedded, name) is not None, name
