"""The embedded donors shipped with the package (``splitllama/donors/embedded/``): what ``python run.py``
uses without building. They are an artefact: built by ``python -m splitllama.embedded build --ship``
from the recipe in ``conf/donors/tiny.yaml``, with a manifest these tests check them against."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from splitllama.embedded import (
    SHIPPED_DONORS,
    EmbeddedRecipe,
    ensure_embedded_donors,
    evaluate_lm,
    main,
    read_corpus_pack,
    shipped_donors,
    verify_cache,
)

from tests.conftest import compose_run_config

MANIFEST = json.loads((SHIPPED_DONORS / "manifest.json").read_text())


def test_files_match_the_manifest() -> None:
    assert verify_cache(SHIPPED_DONORS) == []
    names = set(MANIFEST["files"])
    assert {"small/model.safetensors", "large/model.safetensors", "tokenizer/tokenizer.json", "heldout_blocks.safetensors"} <= names
    on_disk = {str(p.relative_to(SHIPPED_DONORS)) for p in SHIPPED_DONORS.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert on_disk == names  # nothing unlisted rides along
    assert sum(meta["size"] for meta in MANIFEST["files"].values()) < 32 * 2**20


def test_manifest_recipe_is_the_configs() -> None:
    """conf/donors/tiny.yaml (through the schema), ``EmbeddedRecipe()`` and the manifest are one recipe."""
    from splitllama.run.settings import embedded_recipe

    recipe = embedded_recipe(compose_run_config())
    assert recipe == EmbeddedRecipe()
    assert MANIFEST["recipe_hash"] == recipe.recipe_hash()
    assert MANIFEST["recipe"] == json.loads(json.dumps(asdict(recipe)))
    corpus = MANIFEST["corpus"]
    assert corpus["corpus"] == recipe.corpus and len(corpus["sha256"]) == 64 and corpus["documents"] > 5000
    assert set(corpus["packages"]) == set(recipe.packages)
    build = MANIFEST["build"]
    assert build["command"].startswith("python -m splitllama.embedded build") and build["commit"]


def test_donors_are_in_real_proportions_and_in_order() -> None:
    """Width 1:2, depth 1:2.5, non-embedding parameters between 1:6 and 1:12, GQA in both, and the large
    donor at least 0.3 nats better on held-out text (Llama-2-7B vs 70B: about 0.25 in training loss)."""
    from transformers import LlamaConfig

    small, large = LlamaConfig.from_pretrained(SHIPPED_DONORS / "small"), LlamaConfig.from_pretrained(SHIPPED_DONORS / "large")
    assert large.hidden_size == 2 * small.hidden_size
    assert 2 <= large.num_hidden_layers / small.num_hidden_layers <= 3
    metrics = MANIFEST["metrics"]
    assert 6 <= metrics["large_non_embedding_parameters"] / metrics["small_non_embedding_parameters"] <= 12
    for config in (small, large):
        assert config.num_key_value_heads < config.num_attention_heads and config.head_dim == 32
        assert config.num_key_value_heads == 2 and config.vocab_size == 4096 and not config.tie_word_embeddings
    assert metrics["small_val_loss"] - metrics["large_val_loss"] >= 0.3
    assert metrics["small_heldout_loss"] - metrics["large_heldout_loss"] >= 0.3
    assert (SHIPPED_DONORS / "small" / "tokenizer.json").read_bytes() == (SHIPPED_DONORS / "large" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("which", ["small", "large"])
def test_donor_rescored_on_the_held_out_blocks_matches_the_manifest(which: str) -> None:
    """Loaded on this CPU, each donor scores the shipped held-out blocks within 0.01 nats of what the build
    recorded for them on its GPU (the 16-bit weights as saved, read into float32)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    blocks = load_file(SHIPPED_DONORS / "heldout_blocks.safetensors")["input_ids"].long()
    assert blocks.shape == (MANIFEST["recipe"]["heldout_blocks"], MANIFEST["recipe"]["seq_len"])
    model = LlamaForCausalLM.from_pretrained(SHIPPED_DONORS / which, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    loss = evaluate_lm(model, blocks)
    assert abs(loss - MANIFEST["metrics"][f"{which}_heldout_loss"]) < 0.01, (loss, MANIFEST["metrics"][f"{which}_heldout_loss"])


def test_default_run_uses_the_shipped_donors_without_building(tmp_path: Path) -> None:
    donors = ensure_embedded_donors(EmbeddedRecipe(), tmp_path / "empty-cache", progress=False)
    assert not donors.built_now and donors.path8b == SHIPPED_DONORS / "small" and donors.path70b == SHIPPED_DONORS / "large"
    assert not (tmp_path / "empty-cache").exists()  # nothing built, nothing cached
    # another recipe is not these donors
    assert shipped_donors(EmbeddedRecipe.from_dict({**asdict(EmbeddedRecipe()), "seed": 1})) is None


def test_damaged_shipped_donors_are_an_error_not_a_rebuild(tmp_path: Path) -> None:
    copy = tmp_path / "embedded"
    shutil.copytree(SHIPPED_DONORS, copy)
    weights = copy / "small" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"shipped embedded donors in .* do not match their manifest: .*small/model.safetensors"):
        shipped_donors(EmbeddedRecipe(), copy)


def test_build_command_end_to_end_on_a_tiny_recipe(tmp_path: Path, embedded_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m splitllama.embedded corpus`` then ``build --documents``: a pack made on one machine builds
    donors elsewhere; the manifest records the pack's identity, the recipe hash and every file's sha256."""
    tiny = ["corpus=stdlib_docstrings", "packages=[]", "vocab_size=300", "batch_size=2", "seq_len=32", "eval_blocks=4",
            "eval_every=null", "heldout_blocks=3", "small.pretrain_steps=2", "large.pretrain_steps=2", "small.warmup_steps=1",
            "large.warmup_steps=1", "small.num_layers=1", "large.num_layers=2", "small.hidden_size=64", "small.num_heads=2",
            "small.intermediate_size=96", "large.intermediate_size=96"]
    pack = tmp_path / "corpus.json.xz"
    assert main(["corpus", "--out", str(pack), "--cache-dir", str(embedded_cache), "--set", *tiny]) == 0
    identity, documents = read_corpus_pack(pack)
    assert identity["documents"] == len(documents) > 1000 and identity["corpus"] == "stdlib_docstrings"
    out = tmp_path / "donors"
    assert main(["build", "--out", str(out), "--documents", str(pack), "--cache-dir", str(tmp_path / "cache"), "--set", *tiny]) == 0
    assert "small donor: val" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert verify_cache(out) == [] and manifest["corpus"]["sha256"] == identity["sha256"] and manifest["corpus"]["pack"] == pack.name
    recipe = EmbeddedRecipe.from_dict({**asdict(EmbeddedRecipe()), "corpus": "stdlib_docstrings", "packages": [], "vocab_size": 300,
                                       "batch_size": 2, "seq_len": 32, "eval_blocks": 4, "eval_every": None, "heldout_blocks": 3,
                                       "small": {**asdict(EmbeddedRecipe().small), "pretrain_steps": 2, "warmup_steps": 1, "num_layers": 1,
                                                 "hidden_size": 64, "num_heads": 2, "intermediate_size": 96},
                                       "large": {**asdict(EmbeddedRecipe().large), "pretrain_steps": 2, "warmup_steps": 1, "num_layers": 2,
                                                 "intermediate_size": 96}})
    assert manifest["recipe_hash"] == recipe.recipe_hash()
    from safetensors import safe_open

    with safe_open(out / "large" / "model.safetensors", "pt") as handle:  # 16-bit weights
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    assert main(["verify", str(out)]) == 0
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    assert main(["verify", str(out)]) == 1
    # a damaged pack is refused
    import lzma

    with lzma.open(pack, "rt") as handle:
        data = json.load(handle)
    data["documents"][0] += "x"
    with lzma.open(pack, "wt") as handle:
        json.dump(data, handle)
    with pytest.raises(ValueError, match="do not match the SHA-256 its identity records"):
        read_corpus_pack(pack)
