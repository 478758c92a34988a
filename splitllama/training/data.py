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

from .errors import RunConfigError

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


#: bump when the packing rule changes, so cached blocks from the old rule are not reused
PACKING_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything that decides a fast tokenizer's ids (its serialised pipeline and the
    bos/eos ids :func:`pack_documents` adds); ``None`` for a tokenizer that cannot be serialised,
    whose blocks are then not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    ident = json.dumps([backend.to_str(), tokenizer.bos_token_id, tokenizer.eos_token_id])
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def tokenizer_mapping(tokenizer: Any) -> dict[str, Any] | None:
    """What decides which id a fast tokenizer gives to which text, in parts that can be compared across two
    tokenizers: ``vocabulary`` (token -> id, added tokens included), ``merges`` (a BPE model's), ``special
    tokens`` (bos/eos/pad/unk and every added special token, with their ids) and ``normalization`` (the
    normalizer and pre-tokenizer). ``None`` for a tokenizer that cannot be serialised. Settings that do not
    change the mapping (padding, truncation, the decoder) are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = json.loads(backend.to_str())
    model = pipeline.get("model") or {}
    specials = {name: (getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None))
                for name in ("bos", "eos", "pad", "unk")}
    added = sorted((t["content"], t["id"]) for t in pipeline.get("added_tokens") or [] if t.get("special"))
    return {
        "vocabulary": tokenizer.get_vocab(),
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        "special tokens": {"named": specials, "added": added},
        "normalization": {"normalizer": pipeline.get("normalizer"), "pre_tokenizer": pipeline.get("pre_tokenizer"),
                          "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")}},
    }


def documents_fingerprint(documents: Sequence[str]) -> str:
    """SHA-256 of a corpus: each document's text, in order (what a run's data is, wherever its files lie)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def packed_splits(
    tokenizer: Any, documents: Sequence[str], seq_len: int, val_fraction: float, *, cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, val_blocks)``: :func:`split_documents`, then :func:`pack_documents` for each.

    Tokenising is the costly part of a run's start (seconds per MB of text on a laptop core) and
    gives the same blocks every time, so with ``cache_dir`` the blocks are kept in
    ``<cache_dir>/blocks/<key>.pt``, keyed by the tokenizer's fingerprint, the documents' text,
    ``seq_len``, ``val_fraction`` and :data:`PACKING_VERSION`: any change to one of them is a new
    key, never a stale hit. The file is written whole under a temporary name and renamed, so an
    interrupted run or a second rank leaves no half-written cache.
    """
    fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    path: Path | None = None
    if fingerprint is not None:
        key = json.dumps([PACKING_VERSION, fingerprint, seq_len, val_fraction, len(documents), documents_fingerprint(documents)])
        path = Path(os.path.expanduser(cache_dir)) / "blocks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"  # type: ignore[arg-type]
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                train, val = cached["train"].long(), cached["val"].long()
                if train.dim() == val.dim() == 2 and train.shape[1] == val.shape[1] == seq_len:
                    logger.info("data: packed blocks from the cache %s", path)
                    return train, val
            except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, not trusted
                logger.warning("data: ignoring the unreadable block cache %s (%s)", path, exc)
    train_docs, val_docs = split_documents(documents, val_fraction)
    train, val = pack_documents(tokenizer, train_docs, seq_len), pack_documents(tokenizer, val_docs, seq_len)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        small = torch.int32 if max(int(train.max()), int(val.max())) < 2**31 else torch.long
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"train": train.to(small), "val": val.to(small)}, tmp)
        os.replace(tmp, path)
    return train, val


def read_text_files(files: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents from user files: ``.jsonl`` (one JSON object per line, its ``text_field`` a string) or plain
    text (documents separated by blank lines), UTF-8. Every error names the file (and the line where there
    is one): a missing file or a directory, bytes that are not UTF-8, a file without documents, a row that
    is not JSON, lacks the field, or holds something other than text (null, a number: never stringified)."""
    documents: list[str] = []
    for name in files:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            raise RunConfigError(f"data.files: {path} is a directory; list the .txt or .jsonl files in it")
        if not path.is_file():
            raise RunConfigError(f"data.files: {path} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise RunConfigError(f"data.files: {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                 "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None
        found = _jsonl_documents(path, text, text_field) if path.suffix == ".jsonl" else [
            p.strip() for p in text.split("\n\n") if p.strip()]
        if not found:
            raise RunConfigError(f"data.files: {path} holds no documents ({'an empty file' if not raw else 'only whitespace'})")
        documents.extend(found)
    return documents


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[str]:
    documents = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunConfigError(f"data.files: {path}:{lineno} is not valid JSON ({exc.msg}, column {exc.colno}); "
                                 "a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict) or text_field not in record:
            raise RunConfigError(f"data.files: {path}:{lineno} has no field data.text_field={text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise RunConfigError(f"data.files: {path}:{lineno}: its {text_field!r} is {json.dumps(value)[:40]}, not text; "
                                 "each row's data.text_field must be a JSON string")
        documents.append(value)
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


__all__ = [
    "BlockDataset",
    "ResumableBlockSampler",
    "SplitTextDataModule",
    "documents_fingerprint",
    "in_validation",
    "pack_documents",
    "read_text_files",
    "split_documents",
    "tokenizer_mapping",
]
