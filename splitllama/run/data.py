"""The run's data: the documents of ``data.source`` and the Lightning data module ``conf/data/*.yaml`` build.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from .schema import DATA_CORPUS, DataSource
from .settings import cache_dir


def load_documents(source: Any, *, files: Sequence[str] = (), text_field: str = "text", min_doc_chars: int = 80,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> list[str]:
    """The documents of ``data.source``: a standard-library corpus (cached under ``cache_dir``) or ``files``."""
    from ..data import read_text_files

    source = DataSource(source)
    if source in DATA_CORPUS:
        from ..embedded import load_stdlib_corpus

        return load_stdlib_corpus(cache_dir, min_doc_chars, corpus=DATA_CORPUS[source], progress=progress)
    return read_text_files(list(files), text_field)


def text_datamodule(
    *, tokenizer: Any, source: Any, files: Sequence[str] = (), text_field: str = "text", min_doc_chars: int = 80,
    seq_len: int = 256, batch_size: int = 8, val_batch_size: int | None = None, val_fraction: float = 0.05,
    max_val_blocks: int | None = None, num_workers: int = 0, train_steps: int = 100, accumulate_grad_batches: int = 1,
    seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
    documents: Sequence[str] | None = None, name: str | None = None,
) -> Any:
    """The data module ``conf/data/*.yaml`` build (their ``_target_``): a :class:`~splitllama.training.data.SplitTextDataModule`
    over the documents of ``source`` (:func:`load_documents`), tokenised with ``tokenizer``.

    The data fields come from the config; the run adds ``tokenizer``, ``cache_dir``, ``train_steps``,
    ``accumulate_grad_batches``, ``seed`` and ``progress`` (:func:`make_datamodule`). ``documents`` given:
    that corpus instead of ``source``'s (tests, notebooks). ``name`` is the option's name (``data=<name>``),
    part of the config; the data module does not need it.
    """
    from ..training.data import SplitTextDataModule

    if documents is None:
        documents = load_documents(source, files=files, text_field=text_field, min_doc_chars=min_doc_chars,
                                   cache_dir=cache_dir, progress=progress)
    return SplitTextDataModule(
        tokenizer, documents, seq_len=seq_len, batch_size=batch_size, val_batch_size=val_batch_size,
        val_fraction=val_fraction, train_steps=train_steps, accumulate_grad_batches=accumulate_grad_batches,
        max_val_blocks=max_val_blocks, num_workers=num_workers, seed=seed, cache_dir=cache_dir,
    )


def make_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    """``data``'s data module, built from its ``_target_`` (:func:`text_datamodule`) with the run's tokenizer,
    cache, steps and seed."""
    from hydra.utils import instantiate

    return instantiate(cfg.data, _partial_=True, _convert_="all")(
        tokenizer=tokenizer, cache_dir=cache_dir(cfg), train_steps=cfg.trainer.max_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, seed=cfg.seed, progress=cfg.trainer.enable_progress_bar,
    )


__all__ = ["load_documents", "make_datamodule", "text_datamodule"]
