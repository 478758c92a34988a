"""The donors as reference (:mod:`splitllama.references`): the scores, their cache, the gap closed.

The end-to-end checks (results.json, W&B, sweep summary, figures) are in ``test_run.py`` and
``test_sweeps.py``; these test the scoring itself against independent computations.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from splitllama.references import gap_closed, gap_undefined, score_donor, score_references

from tests.conftest import VOCAB, quick_recipe


def test_gap_closed_is_zero_at_the_small_donor_and_one_at_the_large() -> None:
    assert gap_closed(6.0, 6.0, 5.0) == 0.0
    assert gap_closed(5.0, 6.0, 5.0) == 1.0
    assert gap_closed(5.75, 6.0, 5.0) == pytest.approx(0.25)
    assert gap_closed(6.5, 6.0, 5.0) == pytest.approx(-0.5)  # worse than the small donor alone
    assert gap_closed(None, 6.0, 5.0) is None and gap_closed(float("nan"), 6.0, 5.0) is None
    # equal donors: no gap to close, and the reason says so
    assert gap_closed(5.5, 5.0, 5.0) is None
    assert "score the same" in gap_undefined(5.0, 5.0)
    assert gap_undefined(6.0, 5.0) is None


def _expected_loss(path: Path, blocks: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every predicted token, written out by hand."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()


def test_scores_are_the_next_token_loss_and_are_cached_per_checkpoint_and_blocks(
    small_donor: Path, large_donor: Path, tmp_path: Path
) -> None:
    blocks = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))
    refs = score_references(small_donor, large_donor, blocks, cache_dir=tmp_path, batch_size=4)
    assert refs.small.val_loss == pytest.approx(_expected_loss(small_donor, blocks), abs=1e-5)
    assert refs.large.val_loss == pytest.approx(_expected_loss(large_donor, blocks), abs=1e-5)
    assert not refs.small.cached and not refs.large.cached and refs.val_blocks == 6
    again = score_references(small_donor, large_donor, blocks, cache_dir=tmp_path)
    assert again.small.cached and again.large.cached and again.small.val_loss == refs.small.val_loss
    # other blocks: scored again
    assert not score_donor(small_donor, blocks[:3], which="small", cache_dir=tmp_path).cached
    # a checkpoint replaced in place (same path, new files): scored again
    copy = tmp_path / "small_copy"
    shutil.copytree(small_donor, copy)
    assert not score_donor(copy, blocks, which="small", cache_dir=tmp_path).cached
    assert score_donor(copy, blocks, which="small", cache_dir=tmp_path).cached
    shard = next(copy.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert not score_donor(copy, blocks, which="small", cache_dir=tmp_path).cached


def test_a_donor_without_the_tokens_fails_naming_it(small_donor: Path, tmp_path: Path) -> None:
    blocks = torch.full((2, 8), VOCAB + 5)
    with pytest.raises(ValueError, match=rf"small donor at .* has vocab_size={VOCAB} .* token id {VOCAB + 5}"):
        score_donor(small_donor, blocks, which="small", cache_dir=tmp_path)
    assert not list((tmp_path / "references").glob("*.json"))


def test_embedded_donors_score_as_their_build_did_on_the_same_blocks(embedded_cache: Path) -> None:
    """The build scored each donor on its validation blocks; scoring those blocks again gives the same loss."""
    from transformers import AutoTokenizer

    from splitllama.data import pack_documents, split_documents
    from splitllama.embedded import ensure_embedded_donors, load_stdlib_corpus

    recipe = quick_recipe()
    built = ensure_embedded_donors(recipe, embedded_cache, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(built.tokenizer_dir)
    _, val_docs = split_documents(load_stdlib_corpus(embedded_cache, recipe.min_doc_chars, progress=False), recipe.val_fraction)
    blocks = pack_documents(tokenizer, val_docs, recipe.seq_len)[: recipe.eval_blocks]
    refs = score_references(built.path8b, built.path70b, blocks, cache_dir=embedded_cache)
    assert refs.small.val_loss == pytest.approx(built.manifest["metrics"]["small_val_loss"], abs=1e-4)
    assert refs.large.val_loss == pytest.approx(built.manifest["metrics"]["large_val_loss"], abs=1e-4)


# ------------------------------------------------------------------ the donors trained alike (issue 31)
#: the debug=quick budget with the references trained alike on, a grid of three learning rates
TUNED = ("debug=quick", "logger=none", "eval.tuned_references=true", "eval.tuned_lr_grid=[1e-4,1e-3,1e-2]")


@pytest.fixture(scope="module")
def tuned_run(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick training run with the donors trained alike (its own cache copy, so the grid is trained here),
    then the same run again: the second reads every reference from the cache."""
    import json

    from tests.conftest import run_in_process

    cache = tmp_path_factory.mktemp("tuned-cache")
    shutil.copytree(embedded_cache, cache, dirs_exist_ok=True, ignore=shutil.ignore_patterns("references"))
    env = {**os.environ, "SPLITLLAMA_CACHE": str(cache), "WANDB_MODE": "offline"}
    runs = {}
    for name in ("first", "again"):
        run_dir = tmp_path_factory.mktemp(name)
        run_in_process(*TUNED, f"hydra.run.dir={run_dir}", environ=env)
        runs[name] = json.loads((run_dir / "results.json").read_text())
    runs["cache"] = cache
    return runs


def test_a_run_records_both_donors_trained_alike_and_the_gap_against_them(tuned_run: dict) -> None:
    first = tuned_run["first"]
    refs, metrics = first["references"], first["metrics"]
    for which in ("small", "large"):
        tuned = refs[f"{which}_tuned"]
        assert set(tuned["grid"]) == {"0.0001", "0.001", "0.01"} and tuned["cached"] is False
        assert tuned["val_loss"] == min(tuned["grid"].values()) and tuned["grid"][f"{tuned['lr']:g}"] == tuned["val_loss"]
        assert tuned["steps"] == first["metrics"]["steps"] == 8
        assert tuned["tokens"] == first["metrics"]["train_tokens_seen"]  # the same budget: steps x batch x seq_len
        # trained on the data, each donor gets better on the run's blocks than as shipped (the grid's best point)
        assert tuned["val_loss"] < refs[which]["val_loss"]
    expected = (refs["small_tuned"]["val_loss"] - metrics["val_loss"]) / (refs["small_tuned"]["val_loss"] - refs["large_tuned"]["val_loss"])
    assert metrics["gap_closed_tuned"] == pytest.approx(expected)
    assert metrics["gap_closed"] != pytest.approx(metrics["gap_closed_tuned"])  # the two references differ
    assert refs["tuned"]["enabled"] is True


def test_the_second_run_reads_the_references_from_the_cache(tuned_run: dict) -> None:
    first, again = tuned_run["first"]["references"], tuned_run["again"]["references"]
    for which in ("small_tuned", "large_tuned"):
        assert again[which]["cached"] is True and again[which]["grid"] == first[which]["grid"]
    assert tuned_run["again"]["timings"]["tuned_references_s"] < tuned_run["first"]["timings"]["tuned_references_s"] / 3


def test_a_self_stitched_donor_trained_as_a_split_equals_its_tuned_reference(tuned_run: dict, tmp_path: Path) -> None:
    """The reference is the run's own machinery: the small donor run through run.py as a split of itself
    (its first half, identity, its second half), all parameters at the grid's best learning rate, ends at
    the reference's loss: same data, steps, schedule, seed, same number."""
    import json

    from tests.conftest import run_in_process

    small = tuned_run["first"]["references"]["small_tuned"]
    env = {**os.environ, "SPLITLLAMA_CACHE": str(tuned_run["cache"]), "WANDB_MODE": "offline"}
    run_in_process("debug=quick", "logger=none", f"donors.path8b={small['path']}", f"donors.path70b={small['path']}",
                   "layers.n8=2", "layers.n70=2", "adapter=identity", "finetune=all", f"optim.lr={small['lr']}",
                   f"hydra.run.dir={tmp_path}", "task.export=false", environ=env)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["metrics"]["val_loss"] == pytest.approx(small["val_loss"], abs=1e-5)
    # and before training the self-stitch is the donor itself (its score as shipped)
    assert record["metrics"]["val_loss_before"] == pytest.approx(tuned_run["first"]["references"]["small"]["val_loss"], abs=1e-4)


def test_the_cache_key_changes_with_the_budget_the_data_and_the_donor(embedded_cache: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from splitllama.run.data import make_datamodule
    from splitllama.run.donors import load_tokenizer, resolve_donors
    from splitllama.run.references import cache_key, key_hash

    from tests.conftest import compose_run_config

    def key(*overrides: str, donor: str | None = None, documents: list[str] | None = None) -> str:
        cfg = compose_run_config(*TUNED, f"paths.cache_dir={embedded_cache}", *overrides)
        donors = resolve_donors(cfg)
        data = make_datamodule(cfg, load_tokenizer(donors.path8b))
        if documents is not None:
            data.documents = documents
        return key_hash(cache_key(cfg, donor or donors.path8b, data))

    base = key()
    assert key() == base  # a pure function of what decides the result
    for budget in ("trainer.max_steps=9", "data.batch_size=2", "data.seq_len=32", "optim.warmup_steps=1", "seed=1",
                   "eval.tuned_lr_grid=[1e-3,1e-2,1e-1]", "trainer.accumulate_grad_batches=2"):
        assert key(budget) != base, budget
    assert key("adapter=mlp", "layers.n70=2", "optim.lr=0.3") == base  # the split's own settings are not the reference's
    donors = resolve_donors(compose_run_config(*TUNED, f"paths.cache_dir={embedded_cache}"))
    data = make_datamodule(compose_run_config(*TUNED, f"paths.cache_dir={embedded_cache}"), load_tokenizer(donors.path8b))
    assert key(documents=list(data.documents)[:-1]) != base  # the data
    nudged = tmp_path / "small"
    shutil.copytree(donors.path8b, nudged)
    weights = load_file(nudged / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, nudged / "model.safetensors")
    assert key(donor=str(nudged)) != base  # the donor's weights


def test_a_run_with_the_references_trained_alike_off_says_so(run_py, tmp_path: Path) -> None:  # noqa: ANN001
    import json

    run_py.inline("debug=quick", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "task.export=false",
                  f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["references"]["tuned"] == {"enabled": False, "why": "eval.tuned_references=false"}
    assert "small_tuned" not in record["references"] and "gap_closed_tuned" not in record["metrics"]


def test_tuned_references_are_on_for_the_embedded_donors_and_off_for_real_checkpoints(small_donor: Path, large_donor: Path) -> None:
    from splitllama.run.references import enabled

    from tests.conftest import compose_run_config

    assert enabled(compose_run_config()) == (True, "on by default for the embedded donors")
    on, why = enabled(compose_run_config(f"donors.path8b={small_donor}", f"donors.path70b={large_donor}"))
    assert not on and "eval.tuned_references=true turns it on" in why
    assert enabled(compose_run_config(f"donors.path8b={small_donor}", f"donors.path70b={large_donor}", "eval.tuned_references=true"))[0]
    assert enabled(compose_run_config("eval.references=false")) == (False, "eval.references=false")


def test_the_last_line_names_both_references_and_says_whether_the_split_beats_the_small_one_trained_alike() -> None:
    from splitllama.results import outcome_line

    record = {"metrics": {"val_loss": 3.011, "gap_closed": 0.10, "gap_closed_tuned": -0.10},
              "references": {"small": {"val_loss": 3.049}, "large": {"val_loss": 2.671},
                             "small_tuned": {"val_loss": 2.979}, "large_tuned": {"val_loss": 2.656}},
              "flops": {"fraction_of_large_donor": 0.47}}
    assert outcome_line(record) == (
        "validation loss: small donor 3.049 | small trained alike 2.979 | split 3.011 | large trained alike 2.656 | "
        "large donor 2.671; gap closed +0.10 against the donors as shipped, -0.10 against the donors trained alike "
        "(0 = small, 1 = large); the split's training FLOPs per token are 0.47x the large donor's; the split does NOT beat "
        "the small donor trained alike (3.011 >= 2.979): at this budget, training the small donor on the data buys more "
        "than splitting")
    record["metrics"].update(val_loss=2.95, gap_closed_tuned=0.09)
    assert outcome_line(record).endswith("the split beats the small donor trained alike (2.950 < 2.979)")


def test_a_distilled_split_pays_for_its_teacher_in_training_flops() -> None:
    """``objective=distill`` / ``mixed`` run the large donor's forward on every training token: a third of the
    large donor's training FLOPs, added to the split's (inference is the split's forward alone)."""
    from splitllama.configuration_split_llama import SplitLlamaConfig
    from splitllama.embedded import EmbeddedRecipe
    from splitllama.flops import count_flops_per_token

    recipe = EmbeddedRecipe()
    split = SplitLlamaConfig(config_8b=recipe.llama_config("small"), config_70b=recipe.llama_config("large"),
                             num_layers_8=4, num_layers_70=3, adapter="linear")
    lm, distilled = count_flops_per_token(split, 128), count_flops_per_token(split, 128, teacher=True)
    large = lm["large_donor_train_flops_per_token"]
    assert lm["teacher_flops_per_token"] == 0.0 and distilled["teacher_flops_per_token"] == pytest.approx(large / 3)
    assert distilled["train_flops_per_token"] == pytest.approx(lm["train_flops_per_token"] + large / 3)
    assert distilled["fraction_of_large_donor"] == pytest.approx(lm["fraction_of_large_donor"] + 1 / 3)
    assert distilled["forward_flops_per_token"] == lm["forward_flops_per_token"]


#: the steps of each shipped reference recomputed (about 1 s of the small donor, 6 s of the large, on one core):
#: step 1 checks the donor, data and order, the later steps the optimiser and schedule
CHECKED_STEPS = 5


def test_the_shipped_tuned_references_are_what_training_the_donors_gives(tmp_path: Path) -> None:
    """The default recipe's donors trained alike ship precomputed (the manifest's ``tuned_references``, from
    ``python -m splitllama.run.references --ship``): the first run pays nothing for them. The key the default run
    looks up must be the shipped one, and each donor's shipped best grid point must be what training gives here:
    the training losses of its first 5 steps (same weights, data, order, schedule and code; the shipped record
    has :data:`TRACE_STEPS`) recomputed on this machine equal the shipped ones (any change to the data, its
    order, the donor, the model or the optimiser moves them by far more than the tolerance, 1e-4). The whole 600 steps (the validation loss itself) are
    ``python -m splitllama.run.references --check`` (about 2 minutes for the small donor on 2 cores, 10 for the
    large; the shipped values and this machine's agree to 4e-7)."""
    import json

    from splitllama.embedded import SHIPPED_DONORS
    from splitllama.run.data import make_datamodule
    from splitllama.run.donors import load_tokenizer, resolve_donors
    from splitllama.run.references import TRACE_STEPS, cache_key, check_shipped, key_hash

    from tests.conftest import compose_run_config

    shipped = json.loads((SHIPPED_DONORS / "manifest.json").read_text())["tuned_references"]
    cfg = compose_run_config()  # the default run's config (its corpus and blocks cached where the default run put them)
    donors = resolve_donors(cfg)
    data = make_datamodule(cfg, load_tokenizer(donors.path8b))
    data.setup("fit")
    for path in (donors.path8b, donors.path70b):
        result = shipped["results"][key_hash(cache_key(cfg, path, data))]
        best = min(result["points"], key=lambda p: p["val_loss"])
        assert (best["steps"], best["tokens"], len(best["first_losses"])) == (600, 600 * 8 * 128, TRACE_STEPS)
    assert check_shipped(cfg, donors, data, tmp_path, steps=CHECKED_STEPS) == []


def test_the_check_command_names_a_run_with_no_shipped_references(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m splitllama.run.references --check`` on a budget nothing ships for: exit 1, naming both donors
    and the key (no training: there is nothing to compare); ``--ship`` with ``--check`` is refused."""
    from splitllama.run.references import main

    assert main(["--check", "trainer.max_steps=7"]) == 1
    out = capsys.readouterr().out
    assert "small donor: no shipped tuned reference under key" in out and "large donor: no shipped tuned reference" in out
    with pytest.raises(SystemExit, match="--ship or --check, not both"):
        main(["--ship", "--check"])
