"""The embedded default donors: corpus, tokenizer, pre-trained donors, cache reuse and repair.

The donors are built once per test session with the ``debug=quick`` recipe (a few pre-training
steps) into a temporary cache (conftest's ``embedded_cache``) that the run.py tests reuse.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from splitllama.data import in_validation, split_documents
from splitllama.embedded import (
    EmbeddedRecipe,
    ensure_embedded_donors,
    load_stdlib_corpus,
    verify_cache,
)

from tests.conftest import compose_run_config, quick_recipe


@pytest.fixture(scope="session")
def cache_dir(embedded_cache: Path) -> Path:
    return embedded_cache


@pytest.fixture(scope="session")
def donors(cache_dir: Path):
    return ensure_embedded_donors(quick_recipe(), cache_dir, progress=False)


def test_corpus_is_stdlib_docstrings(cache_dir: Path) -> None:
    documents = load_stdlib_corpus(cache_dir, 80, progress=False)
    assert len(documents) > 3000 and sum(map(len, documents)) > 1_000_000
    assert all(len(d) >= 80 for d in documents) and len(set(documents)) == len(documents)
    # a docstring every CPython carries (json module)
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in documents)


def test_stdlib_source_corpus(cache_dir: Path) -> None:
    """The stdlib's source (12 MB), the first part of the default donors' corpus and what runs train and
    validate on (``data=stdlib_source``)."""
    from splitllama.embedded import CORPORA, corpus_key

    assert set(CORPORA) == {"stdlib_source", "stdlib_docstrings", "python_source"}
    documents = load_stdlib_corpus(cache_dir, 80, corpus="stdlib_source", progress=False)
    assert len(documents) > 500 and sum(map(len, documents)) > 8_000_000 and all(len(d) >= 80 for d in documents)
    # whole modules: code and the docstrings in it (json/__init__.py opens with its docstring)
    assert any(d.startswith('r"""JSON (JavaScript Object Notation)') and "def dumps(" in d for d in documents)
    assert load_stdlib_corpus(cache_dir, 80, corpus="stdlib_source", progress=False) == documents  # cached
    assert corpus_key(80, "stdlib_source") != corpus_key(80, "stdlib_docstrings")
    with pytest.raises(ValueError, match="corpus='wiki': unknown; one of stdlib_source, stdlib_docstrings, python_source"):
        load_stdlib_corpus(cache_dir, 80, corpus="wiki", progress=False)


def test_python_source_corpus_is_the_stdlib_then_installed_packages(cache_dir: Path) -> None:
    """The default donors' corpus: the stdlib source, then each named package's ``.py`` files (no tests),
    de-duplicated, long files left out; its cache key names the packages' installed versions."""
    from splitllama.embedded import corpus_key, package_files, package_versions

    stdlib = load_stdlib_corpus(cache_dir, 80, corpus="stdlib_source", progress=False)
    documents = load_stdlib_corpus(cache_dir, 80, corpus="python_source", packages=("yaml", "tqdm"), max_chars=200_000, progress=False)
    capped = [d for d in stdlib if len(d) <= 200_000]
    assert documents[: len(capped)] == capped  # the stdlib first: its held-out files are held out here too
    added = documents[len(capped):]
    yaml_files = package_files("yaml")
    assert yaml_files and all("tests" not in p.parts for p in yaml_files)
    assert yaml_files[0].read_text() in added or len(yaml_files[0].read_text()) < 80
    assert len(set(added)) == len(added) and not set(added) & set(capped) and all(80 <= len(d) <= 200_000 for d in documents)
    assert package_versions(["yaml"])["yaml"] is not None
    assert corpus_key(80, "python_source", ("yaml",)) != corpus_key(80, "python_source", ("yaml", "tqdm"))
    with pytest.raises(ValueError, match="packages: 'no_such_pkg' is not an installed package"):
        load_stdlib_corpus(cache_dir, 80, corpus="python_source", packages=("no_such_pkg",), progress=False)
    with pytest.raises(ValueError, match=r"packages=\['yaml'\]: only corpus='python_source' reads installed packages"):
        load_stdlib_corpus(cache_dir, 80, corpus="stdlib_source", packages=("yaml",), progress=False)


def test_run_data_must_be_the_embedded_donors_corpus() -> None:
    """Validation text from the other stdlib corpus overlaps what the embedded donors trained on: refused."""
    from splitllama.errors import RunConfigError
    from splitllama.run.settings import validate_run_settings

    validate_run_settings(compose_run_config())  # the default: stdlib_source data, python_source donors (stdlib first)
    validate_run_settings(compose_run_config("donors.embedded.corpus=stdlib_source", "donors.embedded.packages=[]"))
    validate_run_settings(compose_run_config("debug=quick"))  # docstrings for both (fast tokenizer)
    with pytest.raises(RunConfigError, match=r"data.source=stdlib_docs: the embedded donors learned donors.embedded.corpus=python_source.*use data=stdlib_source"):
        validate_run_settings(compose_run_config("data=stdlib_docs"))
    with pytest.raises(RunConfigError, match=r"donors.embedded.corpus=wiki: must be one of python_source, stdlib_docstrings, stdlib_source"):
        validate_run_settings(compose_run_config("donors.embedded.corpus=wiki"))
    from splitllama.run.settings import embedded_recipe

    stdlib_only = compose_run_config("donors.embedded.corpus=stdlib_source")  # packages only belong to python_source
    validate_run_settings(stdlib_only)
    assert embedded_recipe(stdlib_only).packages == () and EmbeddedRecipe().packages


def test_split_by_document_is_disjoint_stable_and_nested(cache_dir: Path) -> None:
    documents = load_stdlib_corpus(cache_dir, 80, progress=False)
    train, val = split_documents(documents, 0.05)
    assert not set(train) & set(val) and len(train) + len(val) == len(documents)
    assert 0.03 < len(val) / len(documents) < 0.07
    _, smaller = split_documents(documents, 0.02)
    assert set(smaller) <= set(val)  # a smaller validation share is a subset: no leakage
    assert split_documents(list(reversed(documents)), 0.05)[1] == list(reversed(val))  # order-independent
    assert all(in_validation(d, 0.05) for d in val)


def test_donors_share_tokenizer_and_mirror_llama3_shapes(donors) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    recipe = quick_recipe()
    small, large = LlamaConfig.from_pretrained(donors.path8b), LlamaConfig.from_pretrained(donors.path70b)
    assert (small.hidden_size, small.num_hidden_layers) == (recipe.small.hidden_size, recipe.small.num_layers)
    assert (large.hidden_size, large.num_hidden_layers) == (recipe.large.hidden_size, recipe.large.num_layers)
    assert large.hidden_size > small.hidden_size and large.num_hidden_layers > small.num_hidden_layers
    assert small.head_dim == large.head_dim == 32 and small.num_key_value_heads == large.num_key_value_heads == 2
    assert small.num_attention_heads > small.num_key_value_heads  # GQA
    assert small.vocab_size == large.vocab_size == recipe.vocab_size
    assert (Path(donors.path8b) / "tokenizer.json").read_bytes() == (Path(donors.path70b) / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(donors.path8b)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == recipe.vocab_size
    text = "Return the number of items in the container."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id
    metrics = donors.manifest["metrics"]

    # even a few steps of pre-training leave the uniform-guess loss ln(vocab) behind
    assert metrics["small_val_loss"] < math.log(recipe.vocab_size) - 0.3
    assert metrics["large_val_loss"] < math.log(recipe.vocab_size) - 0.3


def test_build_records_each_donors_loss_curve(donors) -> None:
    """``eval_every``: the manifest keeps (step, validation loss, training seconds) during pre-training."""
    recipe = quick_recipe()
    metrics = donors.manifest["metrics"]
    for which in ("small", "large"):
        steps = getattr(recipe, which).pretrain_steps
        curve = metrics[f"{which}_val_curve"]
        assert [point["step"] for point in curve] == list(range(recipe.eval_every, steps, recipe.eval_every)) != []
        assert all(math.isfinite(point["val_loss"]) and point["val_loss"] > 0 for point in curve)
        assert [point["train_s"] for point in curve] == sorted(point["train_s"] for point in curve)
        assert curve[-1]["train_s"] <= metrics["timings"][f"pretrain_{which}_s"]


def test_tiny_recipe_is_the_schema_and_code_default() -> None:
    """conf/donors/tiny.yaml, the typed schema and ``EmbeddedRecipe()`` describe one recipe (one cache key)."""
    from splitllama.run.settings import embedded_recipe

    assert embedded_recipe(compose_run_config()) == EmbeddedRecipe()


def test_cache_is_reused_and_a_truncated_checkpoint_is_rebuilt(donors, cache_dir: Path, tmp_path: Path) -> None:
    recipe = quick_recipe()
    again = ensure_embedded_donors(recipe, cache_dir, progress=False)
    assert not again.built_now and again.manifest["created"] == donors.manifest["created"]

    # damage a copy of the cache: truncate the large donor's safetensors
    copy_root = tmp_path / "cache"
    shutil.copytree(cache_dir / "embedded", copy_root / "embedded")
    shutil.copytree(cache_dir / "corpus", copy_root / "corpus")
    weights = copy_root / "embedded" / recipe.key() / "large" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    problems = verify_cache(weights.parent.parent)
    assert problems and "model.safetensors" in problems[0]
    rebuilt = ensure_embedded_donors(recipe, copy_root, progress=False)
    assert rebuilt.built_now and verify_cache(weights.parent.parent) == []
    manifest = json.loads((weights.parent.parent / "manifest.json").read_text())
    # same recipe, same seed: the rebuild reproduces the donors bit for bit
    assert manifest["files"]["large/model.safetensors"] == donors.manifest["files"]["large/model.safetensors"]


def test_recipe_key_changes_with_the_recipe() -> None:
    recipe = quick_recipe()
    from dataclasses import asdict

    changed = EmbeddedRecipe.from_dict({**asdict(recipe), "seed": 1})
    assert recipe.key() != changed.key() and recipe.key() == quick_recipe().key()


# ------------------------------------------------------------------ shipped artefacts refuse, never rebuild (issue 32, item 4)
@pytest.fixture()
def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the donors shipped with the package, to damage (the real ones are never touched)."""
    from splitllama.embedded import SHIPPED_DONORS

    return Path(shutil.copytree(SHIPPED_DONORS, tmp_path / "shipped"))


def _edit_manifest(root: Path, edit) -> Path:  # noqa: ANN001
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return path


def test_a_shipped_manifest_with_one_character_of_its_recipe_hash_changed_is_an_error_not_a_build(shipped_copy: Path,
                                                                                                 tmp_path: Path) -> None:
    """Before: the hash no longer matched the default recipe's, so the shipped donors were taken for another recipe's
    and the default run started building donors (hours on a CPU). Now the manifest is checked against itself."""
    from splitllama.embedded.verify import ShippedDonorsError, shipped_donors

    def flip(manifest: dict) -> None:
        h = manifest["recipe_hash"]
        manifest["recipe_hash"] = h[:10] + ("0" if h[10] != "0" else "1") + h[11:]

    path = _edit_manifest(shipped_copy, flip)
    expected = (f"donors.embedded: the shipped embedded donors in {shipped_copy} do not match their manifest: {path}: its recipe_hash "
                r"\S+ is not the hash of the recipe it records \(\S+\): the manifest was edited or damaged; reinstall splitllama")
    with pytest.raises(ShippedDonorsError, match="^" + expected.replace(str(shipped_copy), re.escape(str(shipped_copy)))):
        shipped_donors(EmbeddedRecipe(), shipped_copy)
    cache = tmp_path / "cache"
    with pytest.raises(ShippedDonorsError):
        ensure_embedded_donors(EmbeddedRecipe(), cache, progress=False, shipped=shipped_copy)
    assert not cache.exists()  # nothing built
    # another recipe than the default is still built (and never reads the shipped donors' weights)
    assert shipped_donors(EmbeddedRecipe.from_dict({**asdict(EmbeddedRecipe()), "seed": 1}), shipped_copy) is None
    # and `python -m splitllama.embedded verify` says so too (every file still matches its sha256)
    from splitllama.embedded import main

    assert main(["verify", str(shipped_copy)]) == 1


@pytest.mark.parametrize("damage", ["recipe edited", "manifest not JSON", "manifest missing", "another recipe's donors"])
def test_shipped_donors_that_do_not_match_their_manifest_are_an_error_naming_the_file(shipped_copy: Path, damage: str) -> None:
    from splitllama.embedded.verify import ShippedDonorsError, shipped_donors

    manifest = shipped_copy / "manifest.json"
    if damage == "recipe edited":  # the recipe changed, its hash not: edited by hand
        _edit_manifest(shipped_copy, lambda m: m["recipe"]["small"].update(pretrain_steps=1))
        message = f"{manifest}: its recipe_hash "
    elif damage == "manifest not JSON":
        manifest.write_bytes(manifest.read_bytes()[:100])
        message = f"{manifest} cannot be read as JSON ("
    elif damage == "manifest missing":
        manifest.unlink()
        message = f"{manifest} is missing (the directory holds "
    else:  # an intact manifest of donors built from another recipe, where the default's are expected
        other = EmbeddedRecipe.from_dict({**asdict(EmbeddedRecipe()), "seed": 7})
        _edit_manifest(shipped_copy, lambda m: m.update(recipe=json.loads(json.dumps(asdict(other))), recipe_hash=other.recipe_hash()))
        message = f"{manifest}: they were built from another recipe than this version's default"
    with pytest.raises(ShippedDonorsError, match=re.escape(f"do not match their manifest: {message}")):
        shipped_donors(EmbeddedRecipe(), shipped_copy)


def test_an_interrupted_build_leaves_nothing_behind(cache_dir: Path, tmp_path: Path) -> None:
    """Before: a build that stopped (an error, Ctrl-C) left ``<key>.tmp<pid>`` in the cache for good, and so did a killed
    one. Now a stopped build removes its directory, and the next build removes what a killed one left."""
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir / "corpus", cache / "corpus")  # the corpus is cached: the build gets to its donors at once
    quick = asdict(quick_recipe())
    # a real failure in the middle of the build: after the tokenizer and the held-out blocks were written into the
    # temporary directory, the small donor's attention cannot group 4 heads over 3 KV heads
    recipe = EmbeddedRecipe.from_dict({**quick, "vocab_size": 300, "small": {**quick["small"], "num_kv_heads": 3}})
    killed = cache / "embedded" / f"{recipe.key()}.tmp999999999"  # what a build killed with SIGKILL leaves
    (killed / "tokenizer").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        ensure_embedded_donors(recipe, cache, progress=False)
    assert sorted(p.name for p in (cache / "embedded").iterdir()) == [f"{recipe.key()}.lock"]


def test_building_into_removes_its_directory_on_ctrl_c_and_only_dead_builds_leftovers(tmp_path: Path) -> None:
    """``python -m splitllama.embedded build --out`` holds no lock: a leftover of a build whose process is gone is
    removed, one of a build still running is not."""
    import os
    import subprocess
    import sys

    from splitllama.embedded.build import building_into

    out = tmp_path / "donors"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead, running = out.with_name(f"donors.tmp{int(gone.stdout)}"), out.with_name(f"donors.tmp{os.getppid()}")
    dead.mkdir()
    running.mkdir()
    with pytest.raises(KeyboardInterrupt), building_into(out) as tmp:
        assert not dead.exists() and running.exists() and tmp.is_dir()
        (tmp / "tokenizer").mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]
