"""The embedded default: two small LLaMA donors built offline on any machine, and cached.

``python run.py`` with no arguments needs donors that share a tokenizer and have learned
something, without downloading anything. The recipe (:class:`EmbeddedRecipe`, :mod:`.recipe`):

1. **Corpus** (:mod:`.corpus`): the Python standard library, which every Python installation carries,
   read deterministically (stdlib files in sorted order, no tests, no site-packages), optionally
   followed by the source of installed packages (``python_source``, the default); or the stdlib's
   docstrings (``stdlib_docstrings``), on which every model size levels off near 4.0 nats of
   validation loss within two epochs and then overfits, so a larger donor cannot be better there;
   on the source it can (``benchmarks/README.md``, donor recipes). A corpus pack (:mod:`.pack`)
   carries one machine's exact corpus to another.
2. **Tokenizer**: byte-level BPE (the ``tokenizers`` library), ``vocab_size`` tokens with
   ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, trained on the training documents only and saved as
   a transformers ``PreTrainedTokenizerFast``.
3. **Donors** (:mod:`.build`): Llama-3-like shapes at toy size (GQA; the same head_dim and KV-head
   count in both donors; the large one wider and deeper), each pre-trained briefly on the training
   documents. The validation documents (:func:`splitllama.data.in_validation`) are never seen.

Everything lands in ``<cache_dir>/embedded/<recipe key>/`` with a manifest of SHA-256 hashes
(:mod:`.verify`); a later run verifies the manifest and reuses the donors, a corrupt or truncated
cache is rebuilt; shipped donors that do not match their manifest are an error, never a build. A build
writes into a temporary directory that an interrupted build removes (a killed one's, the next build).
A file lock keeps parallel runs (a Hydra multirun) from building twice. The default recipe's donors
ship with the package (:data:`SHIPPED_DONORS`); :mod:`.cli` is ``python -m splitllama.embedded build|corpus|verify``.
"""

from __future__ import annotations

from .build import (
    build_embedded_donors,
    building_into,
    ensure_embedded_donors,
    evaluate_lm,
    pretrain_donor,
    write_manifest,
)
from .cli import main
from .corpus import (
    CORPORA,
    CORPUS_VERSION,
    DEFAULT_CORPUS_PACKAGES,
    STDLIB_SKIP_DIRS,
    collect_python_source,
    collect_stdlib_docstrings,
    collect_stdlib_source,
    corpus_key,
    default_cache_dir,
    load_stdlib_corpus,
    package_files,
    package_root,
    package_versions,
    stdlib_files,
    stdlib_sources,
)
from .pack import corpus_identity, read_corpus_pack, write_corpus_pack
from .recipe import (
    RECIPE_VERSION,
    SPECIAL_TOKENS,
    DonorRecipe,
    EmbeddedDonors,
    EmbeddedRecipe,
    train_tokenizer,
)
from .verify import SHIPPED_DONORS, ShippedDonorsError, manifest_files, manifest_recipe_problem, shipped_donors, verify_cache

#: the old name of :func:`corpus_key`, for code written before it was public
_corpus_key = corpus_key

__all__ = [
    "CORPORA",
    "CORPUS_VERSION",
    "DEFAULT_CORPUS_PACKAGES",
    "RECIPE_VERSION",
    "SHIPPED_DONORS",
    "SPECIAL_TOKENS",
    "ShippedDonorsError",
    "STDLIB_SKIP_DIRS",
    "DonorRecipe",
    "EmbeddedDonors",
    "EmbeddedRecipe",
    "build_embedded_donors",
    "building_into",
    "collect_python_source",
    "collect_stdlib_docstrings",
    "collect_stdlib_source",
    "corpus_identity",
    "corpus_key",
    "default_cache_dir",
    "ensure_embedded_donors",
    "evaluate_lm",
    "load_stdlib_corpus",
    "main",
    "manifest_files",
    "manifest_recipe_problem",
    "package_files",
    "package_root",
    "package_versions",
    "pretrain_donor",
    "read_corpus_pack",
    "shipped_donors",
    "stdlib_files",
    "stdlib_sources",
    "train_tokenizer",
    "verify_cache",
    "write_corpus_pack",
    "write_manifest",
]
