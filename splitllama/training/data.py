"""Lightning data for split-model training: packed token blocks, a resumable sampler, the data module.

The data layer below it (:mod:`splitllama.data`) splits documents, packs them and fingerprints
them; this module serves the blocks to a Lightning trainer.

Training order is a pure function of ``(seed, global sample index)``: :class:`ResumableBlockSampler`
can start at any position, and :class:`SplitTextDataModule` records how many batches training
consumed in Lightning checkpoints, so ``ckpt_path=...`` resumes the exact data stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._lazy import moved_names
from ..data import packed_splits

logger = logging.getLogger(__name__)


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
        cache_dir: where packed blocks are cached (:func:`packed_splits`); ``None``: tokenise every time.
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
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.documents = list(documents)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_fraction, self.train_steps = val_fraction, train_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.max_val_blocks, self.num_workers, self.seed = max_val_blocks, num_workers, seed
        self.cache_dir = cache_dir
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        #: training batches this rank has consumed (saved in checkpoints; see on_before_batch_transfer)
        self.batches_consumed = 0
        self._resume_batches = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        self.train_blocks, val_blocks = packed_splits(
            self.tokenizer, self.documents, self.seq_len, self.val_fraction, cache_dir=self.cache_dir,
        )
        self.val_blocks = val_blocks[: self.max_val_blocks] if self.max_val_blocks else val_blocks
        logger.info(
            "data: %d documents -> %d train blocks, %d validation blocks of %d tokens (%d validation blocks kept)",
            len(self.documents), len(self.train_blocks), len(val_blocks), self.seq_len, len(self.val_blocks),
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


__all__ = ["BlockDataset", "ResumableBlockSampler", "SplitTextDataModule"]

# the data layer moved to splitllama.data; the old names still resolve, with a DeprecationWarning
__getattr__ = moved_names(__name__, "splitllama.data", (
    "VALIDATION_SALT", "PACKING_VERSION", "documents_fingerprint", "in_validation", "pack_documents", "packed_splits",
    "read_text_files", "split_documents", "tokenizer_fingerprint", "tokenizer_mapping"))
