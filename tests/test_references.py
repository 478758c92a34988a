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
