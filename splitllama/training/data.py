"""Text data for split-model training: documents -> train/validation split -> packed token blocks.

The split is by *document*, before packing, so no validation text ever reaches training (a
block never straddles the two). Membership is a hash of the document's text, so it does not
depend on corpus order, and the validation set of a smaller ``val_fraction`` is a subset of that
of a larger one: the embedded donors hold out the same documents the split model is scored on.

Training order is a pure function of ``(seed, global sample index)``: :class:`ResumableBlockSampler`
can start at any position, and :class:`SplitTextDataModule` records how many batches training
consumed in Lightning checkpoints, so ``ckpt_path=...`` resumes the exact data stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

VALIDATION_SALT = "splitllama-validation"


def in_validation(document: str, val_fraction: float) -> bool:
    """Whether ``document`` belongs to the validation split (a stable hash of its text)."""
    digest = hashlib.sha1((VALIDATION_SALT + document).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split documents into (train, validation), keeping corpus order within each."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    train: list[str] = []
    val: list[str] = []
    for doc in documents:
        (val if in_validation(doc, val_fraction) else train).append(doc)
    if not train or not val:
        raise ValueError(
            f"data.val_fraction={val_fraction}: {len(documents)} documents give {len(train)} for training and "
            f"{len(val)} for validation; both need at least one"
        )
    return train, val


def pack_documents(tokenizer: Any, documents: Sequence[str], seq_len: int, *, chunk: int = 512) -> torch.Tensor:
    """Tokenise documents as ``bos + text + eos``, concatenate, cut into ``(n, seq_len)`` blocks.

    Special tokens are added here explicitly (not by the tokenizer's template), so every
    tokenizer packs the same way. The tail shorter than one block is dropped.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(documents), chunk):
        batch = list(documents[start : start + chunk])
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if bos is not None:
                stream.append(bos)
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"data: {len(stream)} tokens, fewer than one block of data.seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_text_files(files: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents from user files: ``.jsonl`` (one JSON object per line, ``text_field``) or plain text
    (documents separated by blank lines)."""
    documents: list[str] = []
    for name in files:
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise FileNotFoundError(f"data.files: {path} does not exist")
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"data.files: {path}:{lineno} is not valid JSON ({exc.msg}, column {exc.colno}); "
                                     "a .jsonl file holds one JSON object per line") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"data.files: {path}:{lineno} has no field data.text_field={text_field!r}")
                documents.append(str(record[text_field]))
        else:
            documents.extend(p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
    return documents


class BlockDataset(Dataset):
    """Fixed-length token blocks; each item is ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class ResumableBlockSampler(Sampler[int]):
    """An endless shuffled stream of block indices, cut to ``num_samples`` per rank.

    Global sample ``i`` is block ``perm_e[i % n]`` with ``e = i // n`` and ``perm_e`` a permutation
    drawn from ``seed + e``; rank ``r`` of ``w`` takes global samples ``j * w + r``. The stream is a
    pure function of the index, so starting at ``start`` (samples this rank already consumed)
    continues a run exactly.

    The length stays ``num_samples`` when starting later: the whole run is one Lightning epoch,
    and a resumed Lightning restores its batch index inside that epoch, so it counts the samples
    before ``start`` as seen and ends the epoch (and the run) with the stream's last sample. A
    shorter length would end the epoch early and start a second pass at ``start`` again.
    """

    def __init__(self, num_blocks: int, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.num_blocks, self.num_samples, self.seed = num_blocks, num_samples, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[int]:
        epoch, perm = -1, None
        for local in range(self.start, self.num_samples):
            index = local * self.world_size + self.rank
            if index // self.num_blocks != epoch:
                epoch = index // self.num_blocks
                perm = self._permutation(epoch)
            yield int(perm[index % self.num_blocks])

    def __len__(self) -> int:
        return self.num_samples


class SplitTextDataModule(pl.LightningDataModule):
    """Tokenise documents with the split model's tokenizer, split by document, pack, serve batches.

    Args:
        tokenizer: the small donor's tokenizer (the split model reads its token ids).
        documents: the corpus, in a deterministic order.
        seq_len, batch_size, val_batch_size: block length and per-device batch sizes.
        val_fraction: share of documents held out (hash of the text, see :func:`in_validation`).
        train_steps: optimizer steps the run will take; with ``accumulate_grad_batches`` this
            sizes the training stream.
        max_val_blocks: cap on validation blocks (``None``: all).
        seed: shuffling seed of the training stream.
    """

    def __init__(
        self,
        tokenizer: Any,
        documents: Sequence[str],
        *,
        seq_len: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        train_steps: int = 100,
        accumulate_grad_batches: int = 1,
        max_val_blocks: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.documents = list(documents)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_fraction, self.train_steps = val_fraction, train_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.max_val_blocks, self.num_workers, self.seed = max_val_blocks, num_workers, seed
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        #: training batches this rank has consumed (saved in checkpoints; see on_before_batch_transfer)
        self.batches_consumed = 0
        self._resume_batches = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        train_docs, val_docs = split_documents(self.documents, self.val_fraction)
        self.train_blocks = pack_documents(self.tokenizer, train_docs, self.seq_len)
        val_blocks = pack_documents(self.tokenizer, val_docs, self.seq_len)
        self.val_blocks = val_blocks[: self.max_val_blocks] if self.max_val_blocks else val_blocks
        logger.info(
            "data: %d train documents -> %d blocks, %d validation documents -> %d blocks of %d tokens",
            len(train_docs), len(self.train_blocks), len(val_docs), len(self.val_blocks), self.seq_len,
        )

    @property
    def train_tokens(self) -> int:
        return 0 if self.train_blocks is None else self.train_blocks.numel()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        # shard by the strategy's data-parallel rank (megatron: ranks of one TP/PP group see the same data)
        shard = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
        if shard:
            return shard["rank"], shard["num_replicas"]
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        assert self.train_blocks is not None, "call setup() first"
        rank, world = self._rank_world()
        samples = self.train_steps * self.accumulate_grad_batches * self.batch_size
        self.batches_consumed = self._resume_batches
        sampler = ResumableBlockSampler(
            len(self.train_blocks), samples, seed=self.seed, rank=rank, world_size=world,
            start=self._resume_batches * self.batch_size,
        )
        return DataLoader(
            BlockDataset(self.train_blocks), batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, generator=self._private_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_blocks is not None, "call setup() first"
        rank, world = self._rank_world()
        blocks = self.val_blocks[rank::world] if world > 1 else self.val_blocks
        return DataLoader(
            BlockDataset(blocks), batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
            generator=self._private_generator(),
        )

    def _private_generator(self) -> torch.Generator:
        # A DataLoader draws a seed from its generator each time it is iterated; by default that is
        # the global RNG, so a validation pass would shift the random stream of training (dropout)
        # and a resumed run would diverge from an uninterrupted one.
        return torch.Generator().manual_seed(self.seed)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called when the training loop takes a batch (not when the fetcher prefetches one), so
        # this counts exactly the batches training consumed.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed or state_dict.get("seq_len", self.seq_len) != self.seq_len:
            logger.warning("resuming with a different data seed or seq_len: the data stream will not continue exactly")
        self._resume_batches = int(state_dict.get("batches_consumed", 0))


__all__ = [
    "BlockDataset",
    "ResumableBlockSampler",
    "SplitTextDataModule",
    "in_validation",
    "pack_documents",
    "read_text_files",
    "split_documents",
]
