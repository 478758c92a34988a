"""What determines the embedded donors: their recipe (whose hash keys the cache), and the tokenizer they share.

A recipe is the corpus settings, the byte-level BPE tokenizer's size, and each donor's shape and
pre-training budget; :meth:`EmbeddedRecipe.recipe_hash` is what the shipped donors' manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .corpus import DEFAULT_CORPUS_PACKAGES, corpus_key, load_stdlib_corpus

#: Bump when the recipe's code changes in a way that changes what it builds.
RECIPE_VERSION = 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(documents: Sequence[str], vocab_size: int, *, progress: bool = True) -> Any:
    """Byte-level BPE trained on ``documents``, as a ``PreTrainedTokenizerFast`` with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, add_bos_token=True,
        model_max_length=1 << 20,
    )


@dataclass(frozen=True)
class DonorRecipe:
    """Shape and pre-training budget of one embedded donor."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    pretrain_steps: int
    lr: float = 3e-3
    #: linear warmup steps before the cosine decay (``None``: a tenth of ``pretrain_steps``)
    warmup_steps: int | None = None


@dataclass(frozen=True)
class EmbeddedRecipe:
    """Everything that determines the embedded donors; its hash keys the cache."""

    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 64
    val_fraction: float = 0.05
    min_doc_chars: int = 80
    #: documents longer than this are left out (generated tables, vendored bundles); ``None``: no limit
    max_doc_chars: int | None = 200_000
    #: which text the tokenizer and both donors learn (:data:`~splitllama.embedded.corpus.CORPORA`)
    corpus: str = "python_source"
    #: installed top-level packages whose ``.py`` files follow the stdlib source (``corpus=python_source``)
    packages: tuple[str, ...] = DEFAULT_CORPUS_PACKAGES
    seed: int = 0
    #: validation blocks the build scores each donor on (``None``: all of them)
    eval_blocks: int | None = 1024
    #: also score each donor every this many pre-training steps (``None``: only at the end); the
    #: manifest keeps the curve, which is how a recipe's step counts are chosen
    eval_every: int | None = 500
    #: validation blocks saved beside the donors with their scores in the manifest: a fixed set on
    #: which anyone can check that the files they have are the donors that were built
    heldout_blocks: int = 64
    small: DonorRecipe = field(default_factory=lambda: DonorRecipe(128, 4, 4, 2, 32, 448, pretrain_steps=4000, lr=3e-3, warmup_steps=400))
    large: DonorRecipe = field(default_factory=lambda: DonorRecipe(256, 10, 8, 2, 32, 896, pretrain_steps=4000, lr=3e-3, warmup_steps=400))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmbeddedRecipe:
        values = dict(values)
        small = DonorRecipe(**values.pop("small")) if "small" in values else cls().small
        large = DonorRecipe(**values.pop("large")) if "large" in values else cls().large
        if "packages" in values:
            values["packages"] = tuple(values["packages"] or ())
        if values.get("corpus", cls.corpus) != "python_source":  # only that corpus reads packages: not part of another recipe
            values["packages"] = ()
        return cls(**values, small=small, large=large)

    def recipe_hash(self) -> str:
        """SHA-256 of the recipe alone (no machine identity): what the shipped donors' manifest records, so
        that a run knows the recipe it asks for is the one they were built from."""
        ident = {"version": RECIPE_VERSION, "recipe": asdict(self)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def key(self) -> str:
        """The cache key of donors built on this machine: the recipe and this machine's corpus identity."""
        corpus = corpus_key(self.min_doc_chars, self.corpus, self.packages, self.max_doc_chars)
        ident = {"version": RECIPE_VERSION, "corpus": corpus, "recipe": asdict(self)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def corpus_documents(self, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> list[str]:
        """This machine's documents of the recipe's corpus (cached)."""
        return load_stdlib_corpus(cache_dir, self.min_doc_chars, corpus=self.corpus, progress=progress,
                                  packages=self.packages, max_chars=self.max_doc_chars)

    def llama_config(self, which: str) -> Any:
        """The ``LlamaConfig`` of the ``small`` or ``large`` donor (no weights needed)."""
        from ..configuration_split_llama import llama_config

        donor: DonorRecipe = getattr(self, which)
        return llama_config(
            hidden_size=donor.hidden_size,
            num_hidden_layers=donor.num_layers,
            num_attention_heads=donor.num_heads,
            num_key_value_heads=donor.num_kv_heads,
            head_dim=donor.head_dim,
            intermediate_size=donor.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=max(2048, self.seq_len),
        )


@dataclass(frozen=True)
class EmbeddedDonors:
    """Where the built donors are, and what the build measured."""

    path8b: Path
    path70b: Path
    tokenizer_dir: Path
    manifest: dict[str, Any]
    built_now: bool


__all__ = ["RECIPE_VERSION", "SPECIAL_TOKENS", "DonorRecipe", "EmbeddedDonors", "EmbeddedRecipe", "train_tokenizer"]
