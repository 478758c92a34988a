"""Lazy, validated reading of single-file or sharded safetensors checkpoints.

In the spirit of mergekit's lazy loader: a :class:`LazyCheckpoint` reads only the headers when it
opens a directory (so a missing shard, a truncated file or a malformed index fails at once, naming
the file), and reads a tensor's bytes only when asked, one tensor (or one slice of one tensor, for
tensor parallelism) at a time. Assembling a split model from a 70B donor therefore never holds
the donor in memory.

Headers are parsed here, and tensors read with plain file reads straight into each tensor's
storage (no memory map); ``safetensors.safe_open`` serves only :meth:`LazyCheckpoint.get_slice`.
Parsing also checks each file's size against its header, so a truncated shard fails when the
checkpoint is opened. This reader is kept because it measured faster and leaner than one on
``safe_open``: ``benchmarks/assembly.py`` (``hand reader`` vs ``safe_open reader``, the same
tensors of a 4-small + 4-large-layer split, bf16, cold page cache; ``results/assembly_readers.json``)
gives 0.72 s vs 1.07 s and a peak RSS of 0.71 vs 1.51 GiB, within 1.1x of the raw-read floor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import RunConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(RunConfigError):
    """A checkpoint directory or file is missing, malformed, or lacks a tensor; names the file.

    A :class:`~splitllama.errors.RunConfigError` (so a :class:`ValueError`): ``run.py`` ends with its one line."""


#: the largest header the format allows (the reference reader's ``MAX_HEADER_SIZE``)
MAX_HEADER_BYTES = 100_000_000
#: bits per element of every dtype the safetensors format defines (the reference reader's ``Dtype``)
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_safetensors_header(path: Path, raw: bytes, data_size: int) -> dict[str, Any]:
    """The tensor entries of a safetensors header, checked as the format defines it (what the reference reader
    refuses, refused here too, naming the file and tensor): UTF-8 JSON object; ``__metadata__`` a map of
    strings; each entry a known dtype, a shape of non-negative integers and ``data_offsets`` ``[start, end]``
    spanning exactly the shape's bytes; the entries packed back to back from byte 0 (no gap, no overlap)
    and covering the data region exactly (``data_size`` bytes: shorter is a truncated file, longer has
    bytes no header describes)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object of tensors")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings, not {json.dumps(metadata)[:80]}")
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: its header entry is {json.dumps(entry)[:80]}, not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise CheckpointError(f"{where} has dtype {dtype!r}, not a safetensors dtype ({', '.join(SAFETENSORS_DTYPE_BITS)})")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{where} has shape {shape!r}: must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}: must be [start, end] with 0 <= start <= end")
        bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise CheckpointError(f"{where}: {dtype} of shape {shape} takes {bits / 8:g} bytes, but its data_offsets "
                                  f"{offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            how = "overlaps the tensor before it" if start < position else f"leaves {start - position} bytes before it unused"
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {start} of the data, where the tensors before it end at "
                                  f"{position}: it {how} (the format packs tensors back to back)")
        position = end
    if position > data_size:
        raise CheckpointError(f"{path}: truncated: tensors need {position} bytes of data but the file holds {data_size}")
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor that no header entry describes "
                              f"(tensors need {position} bytes of data, the file holds {data_size}): a corrupt or appended file")
    return header


class _ShardHeader:
    """Parsed header of one safetensors file, checked as the format defines it (:func:`parse_safetensors_header`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > size - 8:
                    raise CheckpointError(f"{path}: truncated or corrupt (header of {header_len} bytes, file of {size})")
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path}: a header of {header_len} bytes, above the format's limit of {MAX_HEADER_BYTES}")
                raw = f.read(header_len)
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
        self.entries = parse_safetensors_header(path, raw, size - 8 - header_len)
        self.data_start = 8 + header_len

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        dtype = self.entries[name]["dtype"]
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {dtype}, which splitllama does not read ({', '.join(_ST_DTYPES)})")
        return _ST_DTYPES[dtype]

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return int(end) - int(start)


class LazyCheckpoint:
    """A Hugging Face checkpoint directory whose tensors are read on demand.

    Args:
        path: a directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and
            its shards (or any single ``*.safetensors`` file).
        role: how error messages name this checkpoint (``path8b``, ``path70b``, ``adapter``...).
    """

    def __init__(self, path: str | os.PathLike[str], role: str = "checkpoint") -> None:
        self.path = Path(path)
        self.role = role
        if self.path.is_file() and self.path.suffix == ".safetensors":
            files = {None: self.path}
            self._weight_map: dict[str, Path] | None = None
        elif not self.path.is_dir():
            raise CheckpointError(f"{role}: {self.path} is not a directory (expected a Hugging Face checkpoint)")
        else:
            files, self._weight_map = self._discover()
        self._headers = {p: _ShardHeader(p) for p in set(files.values())}
        if self._weight_map is None:
            (only,) = self._headers.values()
            self._weight_map = {name: only.path for name in only.entries}
        else:
            for name, shard in self._weight_map.items():
                if name not in self._headers[shard].entries:
                    raise CheckpointError(f"{role}: {INDEX_FILE} puts {name!r} in {shard.name}, which does not hold it")
            for shard, header in sorted(self._headers.items()):
                for name in header.entries:
                    if self._weight_map.get(name) != shard:
                        listed = f"puts it in {self._weight_map[name].name}" if name in self._weight_map else "does not list it"
                        raise CheckpointError(f"{role}: {shard} holds {name!r}, but {INDEX_FILE} {listed}: the index and "
                                              "the shards disagree")
        self._handles: dict[Path, Any] = {}

    def _discover(self) -> tuple[dict[Any, Path], dict[str, Path] | None]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{self.role}: {index} is not a valid safetensors index: {exc}") from exc
            shards = {shard: self.path / shard for shard in set(weight_map.values())}
            for shard, p in sorted(shards.items()):
                if not p.is_file():
                    raise CheckpointError(f"{self.role}: shard {p} listed in {INDEX_FILE} is missing")
            unlisted = sorted(p.name for p in self.path.glob("*.safetensors") if p.name not in shards)
            if unlisted:
                raise CheckpointError(f"{self.role}: {self.path} holds {unlisted[:3]}, which {INDEX_FILE} does not list: the "
                                      "index and the files disagree (a leftover or a shard missing from the index)")
            return shards, {name: shards[shard] for name, shard in weight_map.items()}
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {None: single}, None
        others = sorted(self.path.glob("*.safetensors"))
        if len(others) == 1:
            return {None: others[0]}, None
        legacy = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
        hint = f" (found {legacy[:3]}: convert to safetensors first)" if legacy else ""
        raise CheckpointError(f"{self.role}: no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}")

    # ------------------------------------------------------------------ metadata (no tensor bytes read)
    def names(self) -> list[str]:
        assert self._weight_map is not None
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        assert self._weight_map is not None
        return name in self._weight_map

    def _header(self, name: str) -> _ShardHeader:
        assert self._weight_map is not None
        if name not in self._weight_map:
            raise CheckpointError(f"{self.role}: tensor {name!r} not found in {self.path}")
        return self._headers[self._weight_map[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._header(name).dtype(name)

    def nbytes(self, name: str) -> int:
        return self._header(name).nbytes(name)

    def shard_of(self, name: str) -> Path:
        return self._header(name).path

    # ------------------------------------------------------------------ reading
    def _handle(self, shard: Path) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._handles[shard]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (only its bytes), optionally cast to ``dtype``.

        The bytes are read with plain file reads straight into the tensor's storage: no memory
        map, so reading a tensor costs its size once and leaves nothing mapped behind.
        """
        header = self._header(name)
        entry = header.entries[name]
        start, end = (int(x) for x in entry["data_offsets"])
        # on the CPU whatever the default device (Lightning's configure_model sets the GPU): the
        # bytes land in host memory, the caller moves the tensor
        tensor = torch.empty(tuple(entry["shape"]), dtype=header.dtype(name), device="cpu")
        if end > start:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            with open(header.path, "rb", buffering=0) as f:
                f.seek(header.data_start + start)
                read = 0
                while read < end - start:
                    n = f.readinto(buffer[read:])
                    if not n:
                        raise CheckpointError(f"{self.role}: {header.path} ended while reading {name!r}")
                    read += n
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def get_slice(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ``tensor[..., start:stop, ...]`` along ``dim`` without reading the rest (TP shards)."""
        view = self._handle(self._header(name).path).get_slice(name)
        index = [slice(None)] * len(view.get_shape())
        index[dim] = slice(start, stop)
        tensor = view[tuple(index)]
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def iter_tensors(self, names: list[str] | None = None, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in shard order, for streaming loaders."""
        wanted = self.names() if names is None else names
        for name in sorted(wanted, key=lambda n: (str(self.shard_of(n)), n)):
            yield name, self.get(name, dtype)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the JSON files of a model directory that a loader reads (transformers' config, generation and tokenizer files;
#: the safetensors index): :func:`check_model_dir` parses each one present
MODEL_JSON_FILES = ("config.json", "generation_config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.json")


def check_model_dir(path: str | os.PathLike[str], setting: str, *, model_types: tuple[str, ...] | None = ("llama",),
                    weights: bool = True, fix: str = "") -> LazyCheckpoint | None:
    """Check a model directory (a donor, a saved split model) where it is first read, before anything heavy:
    no tensor's bytes are read, only each file's first bytes and headers.

    - it is a directory holding ``config.json``, a JSON object whose ``model_type`` is one of ``model_types``;
    - every JSON file a loader reads (:data:`MODEL_JSON_FILES`: the index, the tokenizer's and generation files)
      parses;
    - with ``weights``: the safetensors index names only shards that exist, and each safetensors file's header
      parses and its tensors fill the file exactly (a truncated or appended file is caught by its size), through
      :class:`LazyCheckpoint`, which is returned.

    Raises :class:`CheckpointError` ``"<setting>: <file>: <what is wrong>. <fix>"``: ``setting`` names what the
    user gave (``donors.path70b=/ckpt/70B``), ``fix`` the way forward (download it again, export it again).
    """
    root = Path(os.path.expanduser(os.fspath(path)))
    forward = f". {fix}" if fix else ""

    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"{setting}: {message}{forward}")

    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a directory"
        raise refuse(f"{root} {what} (a model directory holds config.json and its weights)")
    for name in MODEL_JSON_FILES:
        file = root / name
        if not file.exists():
            if name == "config.json":
                raise refuse(f"{root} has no config.json: not a Hugging Face model directory")
            continue
        try:
            value = json.loads(file.read_bytes())
        except OSError as exc:
            raise refuse(f"{file} cannot be read ({exc.strerror or exc})") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise refuse(f"{file} is not valid JSON ({exc}): truncated or corrupt") from None
        if not isinstance(value, dict):
            raise refuse(f"{file} holds a JSON {type(value).__name__}, not an object")
        if name == "config.json" and model_types is not None and value.get("model_type") not in model_types:
            raise refuse(f"{file} declares model_type {value.get('model_type')!r}, not {' or '.join(map(repr, model_types))}")
        if name == INDEX_FILE and not isinstance(value.get("weight_map"), dict):
            raise refuse(f"{file} has no \"weight_map\" object: not a safetensors index")
    if not weights:
        return None
    try:
        return LazyCheckpoint(root, role=setting)
    except CheckpointError as exc:
        message = str(exc)
        message = message[len(setting) + 2:] if message.startswith(f"{setting}: ") else message
        raise refuse(message) from None


#: :func:`weights_fingerprint` reads weight files up to this size whole; of a larger one, this many evenly
#: spaced stretches of this size (a real donor's multi-GB shards: 4 MiB each)
FINGERPRINT_WHOLE_BYTES, FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 64 << 20, 16, 256 << 10


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 identifying a checkpoint directory's content wherever it lies: its ``config.json``, its
    safetensors index, and each weight file (``*.safetensors``, ``*.bin``, ``*.pt``) by name, size and
    content: whole up to :data:`FINGERPRINT_WHOLE_BYTES`, else :data:`FINGERPRINT_SAMPLES` stretches spread
    from its first byte (where the safetensors header is) to its last. Reading a few MiB of a multi-GB
    shard, not its weights, it tells a retrained or replaced donor from the one a run started with (a
    change confined to a few bytes of a large shard can pass: the sample is the price of not hashing
    70B weights); a copy elsewhere, or with other file times, is the same donor.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(root.iterdir()):
        if not file.is_file() or not (file.name in ("config.json", INDEX_FILE) or file.suffix in (".safetensors", ".bin", ".pt")):
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= FINGERPRINT_WHOLE_BYTES:
                digest.update(f.read())
                continue
            for i in range(FINGERPRINT_SAMPLES):
                f.seek((size - FINGERPRINT_SAMPLE_BYTES) * i // (FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def load_adapter_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an adapter checkpoint: ``.safetensors`` or a ``.pt``/``.bin`` read with ``weights_only=True``.

    Keys may be relative to the adapter (``adapter_linear_1.weight``), to the base model
    (``adapter.adapter_linear_1.weight``) or full (``model.adapter.adapter_linear_1.weight``);
    they are returned relative to the adapter.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"adapter_checkpoint: {p} does not exist")
    if p.suffix == ".safetensors":
        ckpt = LazyCheckpoint(p, role="adapter_checkpoint")
        state = dict(ckpt.iter_tensors())
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"adapter_checkpoint: cannot read {p} (safetensors or a weights-only torch file): {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"adapter_checkpoint: {p} does not hold a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rel = key
        for prefix in ("model.adapter.", "adapter."):
            if rel.startswith(prefix):
                rel = rel[len(prefix):]
                break
        out[rel] = value
    return out


__all__ = ["CheckpointError", "INDEX_FILE", "MODEL_JSON_FILES", "check_model_dir", "MAX_HEADER_BYTES", "SAFETENSORS_DTYPE_BITS", "SINGLE_FILE", "parse_safetensors_header", "LazyCheckpoint", "load_adapter_state", "weights_fingerprint"]
