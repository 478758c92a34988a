"""The embedded donors shipped with the package (``splitllama/donors/embedded/``): what ``python run.py``
uses without building. They are an artefact: built by ``python -m splitllama.embedded build --ship``
from the recipe in ``conf/donors/tiny.yaml``, with a manifest these tests check them against.

What the manifest says is checked against something independent of it: the parameter counts and
their ratios are counted from the tensors; both donors are re-scored on the shipped held-out blocks
(agreeing with the build's GPU scores to 4e-5 nats in float32, so within 1e-4) and the gap between them
re-computed; the held-out blocks are rebuilt, token for token, from this Python's standard library
(the first held-out document, packed as training packs it) and decoded; the build commit is looked up
in this repository's history; and the README's donor table is compared with the manifest.

Bugs injected into a copy and caught here: the manifest's small held-out loss 5e-3 off (inside the old
0.01-nat tolerance), its large non-embedding parameter count changed, the README table's small loss changed.
The provenance checks hold on the shipped manifest: the donors were rebuilt on one H100 from the clean commit
7e1beb7 (every file's sha256 equal to the earlier build's from a ``-dirty`` checkout, whose commit had no build command).
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
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

from tests.conftest import REPO, compose_run_config

MANIFEST = json.loads((SHIPPED_DONORS / "manifest.json").read_text())
#: how close a re-score on this CPU must come to the build's (measured: 9e-6 small, 4e-5 large, float32 on both)
RESCORE_TOLERANCE = 1e-4


def parameter_counts(which: str) -> tuple[int, int]:
    """``(all, non-embedding)`` parameters of a shipped donor, counted from its safetensors (the embedding and the
    LM head are the embedding parameters; the donors' embeddings are untied)."""
    from safetensors import safe_open

    total = non_embedding = 0
    with safe_open(SHIPPED_DONORS / which / "model.safetensors", "pt") as handle:
        for name in handle.keys():
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= size
            total += count
            if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                non_embedding += count
    return total, non_embedding


@pytest.fixture(scope="module")
def rescored() -> dict[str, float]:
    """Each donor's mean next-token loss on the shipped held-out blocks, computed here in float32."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    blocks = load_file(SHIPPED_DONORS / "heldout_blocks.safetensors")["input_ids"].long()
    assert blocks.shape == (MANIFEST["recipe"]["heldout_blocks"], MANIFEST["recipe"]["seq_len"])
    losses = {}
    for which in ("small", "large"):
        model = LlamaForCausalLM.from_pretrained(SHIPPED_DONORS / which, dtype=torch.float32)
        assert next(model.parameters()).dtype == torch.float32
        losses[which] = evaluate_lm(model, blocks)
    return losses


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


def test_donors_are_in_real_proportions_and_in_order(rescored: dict[str, float]) -> None:
    """Width 1:2, depth 1:2.5, non-embedding parameters between 1:6 and 1:12 (counted from the tensors, and the
    manifest's counts equal to them), GQA in both, one tokenizer, and the large donor at least 0.3 nats better on
    the held-out blocks as re-scored here (Llama-2-7B vs 70B: about 0.25 in training loss)."""
    from transformers import LlamaConfig

    small, large = LlamaConfig.from_pretrained(SHIPPED_DONORS / "small"), LlamaConfig.from_pretrained(SHIPPED_DONORS / "large")
    assert large.hidden_size == 2 * small.hidden_size
    assert 2 <= large.num_hidden_layers / small.num_hidden_layers <= 3
    metrics = MANIFEST["metrics"]
    counted = {which: parameter_counts(which) for which in ("small", "large")}
    for which, (total, non_embedding) in counted.items():
        assert (metrics[f"{which}_parameters"], metrics[f"{which}_non_embedding_parameters"]) == (total, non_embedding), which
    assert 6 <= counted["large"][1] / counted["small"][1] <= 12
    for config in (small, large):
        assert config.num_key_value_heads < config.num_attention_heads and config.head_dim == 32
        assert config.num_key_value_heads == 2 and config.vocab_size == 4096 and not config.tie_word_embeddings
    gap = rescored["small"] - rescored["large"]
    assert gap >= 0.3, rescored
    assert gap == pytest.approx(metrics["small_heldout_loss"] - metrics["large_heldout_loss"], abs=2 * RESCORE_TOLERANCE)
    assert metrics["small_val_loss"] - metrics["large_val_loss"] >= 0.3  # on the build's 1024 validation blocks (not shipped)
    assert (SHIPPED_DONORS / "small" / "tokenizer.json").read_bytes() == (SHIPPED_DONORS / "large" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("which", ["small", "large"])
def test_donor_rescored_on_the_held_out_blocks_matches_the_manifest(rescored: dict[str, float], which: str) -> None:
    """Loaded on this CPU, each donor scores the shipped held-out blocks within 1e-4 nats of what the build recorded
    for them on its GPU (the 16-bit weights as saved, read into float32; measured 9e-6 and 4e-5 apart)."""
    recorded = MANIFEST["metrics"][f"{which}_heldout_loss"]
    assert abs(rescored[which] - recorded) < RESCORE_TOLERANCE, (rescored[which], recorded)


def test_held_out_blocks_are_the_first_held_out_documents() -> None:
    """The shipped held-out blocks are the validation stream as training packs it (``bos + document + eos``, in corpus
    order): rebuilt here from this Python's standard library (the corpus's first part), they are equal token for token,
    and they decode to the start of a document that the validation split holds out and no training document contains."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from splitllama.data import in_validation
    from splitllama.embedded import collect_stdlib_source

    corpus = MANIFEST["corpus"]
    if platform.python_version() != corpus["python"]:
        pytest.skip(f"the held-out blocks come from Python {corpus['python']}'s standard library; this is {platform.python_version()}")
    recipe = MANIFEST["recipe"]
    blocks = load_file(SHIPPED_DONORS / "heldout_blocks.safetensors")["input_ids"].flatten().tolist()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DONORS / "tokenizer")
    documents = collect_stdlib_source(recipe["min_doc_chars"], progress=False, max_chars=recipe["max_doc_chars"])
    held_out = [d for d in documents if in_validation(d, recipe["val_fraction"])]
    stream: list[int] = []
    for document in held_out:
        stream += [tokenizer.bos_token_id, *tokenizer(document, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        if len(stream) >= len(blocks):
            break
    assert stream[: len(blocks)] == blocks
    text = tokenizer.decode(blocks[1:])  # after the first document's bos
    assert held_out[0].startswith(text) and len(text) > 1000, text[:200]
    assert not any(text[:1000] in d for d in documents if not in_validation(d, recipe["val_fraction"]))


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def build_commit() -> str:
    """The manifest's build commit without its ``-dirty`` mark (see :func:`test_build_commit_is_clean`)."""
    build = MANIFEST["build"]
    assert build["command"].startswith("python -m splitllama.embedded build --ship"), build["command"]
    commit = build["commit"].removesuffix("-dirty")
    assert re.fullmatch(r"[0-9a-f]{40}", commit), build["commit"]
    return commit


def test_build_commit_is_in_history() -> None:
    """The manifest's build commit is a commit of this repository's history, an ancestor of HEAD (CI clones it whole)."""
    commit = build_commit()
    assert git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0, f"build commit {commit} is not in this clone's history"
    assert git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0, f"build commit {commit} is not an ancestor of HEAD"


def test_build_commit_holds_the_build_code() -> None:
    """The build commit holds the code of its build command, ``python -m splitllama.embedded build --ship``."""
    commit = build_commit()
    files = git("ls-tree", "-r", "--name-only", commit, "splitllama/embedded.py", "splitllama/embedded/").stdout.split()
    assert files, f"build commit {commit} has no splitllama/embedded(.py|/)"
    code = "".join(git("show", f"{commit}:{f}").stdout for f in files)
    assert '"--ship"' in code and '"build"' in code, f"build commit {commit}'s splitllama.embedded has no `build --ship` command"


def test_build_commit_is_clean() -> None:
    """A clean commit: the code that built the donors is the commit's, not uncommitted changes on top of it."""
    assert not MANIFEST["build"]["commit"].endswith("-dirty"), f"build commit {MANIFEST['build']['commit']}: built with uncommitted changes"


def test_readme_donor_table_is_the_manifest() -> None:
    """The README's table of the embedded donors (shapes, parameters, held-out loss), its ratios and its recipe line
    say what the shipped files and their manifest say."""
    from transformers import LlamaConfig

    readme = (REPO / "README.md").read_text()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| (small|large) \| (.*?) \| ([\d.]+)M \(([\d.]+)M\) \| ([\d.]+) \|$", readme, re.M)}
    assert set(rows) == {"small", "large"}, "README: no donor table (| small | shape | parameters (non-embedding) | held-out loss |)"
    metrics = MANIFEST["metrics"]

    def close(printed: str, value: float) -> bool:  # equal to the printed precision
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        return abs(float(printed) - value) <= 0.5 * 10 ** -decimals + 1e-12

    for which, (shape, total, non_embedding, loss) in rows.items():
        config = LlamaConfig.from_pretrained(SHIPPED_DONORS / which)
        assert shape == (f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
                         f"{config.num_key_value_heads} KV heads, head_dim {config.head_dim}, FFN {config.intermediate_size}"), (which, shape)
        assert close(total, metrics[f"{which}_parameters"] / 1e6) and close(non_embedding, metrics[f"{which}_non_embedding_parameters"] / 1e6), which
        assert close(loss, metrics[f"{which}_val_loss"]), (which, loss, metrics[f"{which}_val_loss"])
    ratio = re.search(r"non-embedding parameters 1:([\d.]+)", readme)
    assert ratio and close(ratio.group(1), metrics["large_non_embedding_parameters"] / metrics["small_non_embedding_parameters"])
    recipe = MANIFEST["recipe"]
    assert recipe["small"]["pretrain_steps"] == recipe["large"]["pretrain_steps"] and recipe["small"]["lr"] == recipe["large"]["lr"]
    lr = re.sub(r"e-0*", "e-", f"{recipe['small']['lr']:.0e}")  # 0.003 -> 3e-3, as the README writes it
    line = f"Each donor was trained for {recipe['small']['pretrain_steps']} steps of {recipe['batch_size']} x {recipe['seq_len']} tokens at lr {lr}"
    assert line in " ".join(readme.split()), line


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


def test_shipping_donors_from_uncommitted_code_is_refused_before_any_work(tmp_path: Path) -> None:
    """``build --ship`` in a checkout with a changed tracked file exits naming the uncommitted changes, before the
    corpus is read or anything built (so no manifest can again record a ``-dirty`` commit): run in a clone of this
    repository whose copy of one module was edited. Outside a git checkout it is refused too; a clean one passes."""
    from splitllama.embedded.build import ship_provenance_problem

    clone = tmp_path / "clone"
    assert git("clone", "--quiet", "--no-checkout", str(REPO), str(clone)).returncode == 0
    assert subprocess.run(["git", "checkout", "--quiet", "HEAD", "--", "."], cwd=clone).returncode == 0
    shipped = clone / "splitllama" / "donors" / "embedded"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shipped.rglob("*"))
    with (clone / "splitllama" / "embedded" / "recipe.py").open("a") as handle:
        handle.write("\n# an uncommitted change\n")
    import sys

    proc = subprocess.run([sys.executable, "-m", "splitllama.embedded", "build", "--ship", "--documents", str(tmp_path / "no-such-pack")],
                          cwd=clone, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "uncommitted changes to tracked files" in proc.stderr and "commit or stash" in proc.stderr, proc.stderr[-2000:]
    assert "no-such-pack" not in proc.stderr  # refused before the corpus pack was opened
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shipped.rglob("*")) == before
    assert "not in a git checkout" in (ship_provenance_problem(None) or "")
    assert ship_provenance_problem("0" * 40) is None


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
