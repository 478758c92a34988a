"""The embedded default: two small LLaMA donors built offline on any machine, and cached.

``python run.py`` with no arguments needs donors that share a tokenizer and have learned
something, without downloading anything. The recipe:

1. **Corpus** (``corpus``): the Python standard library, which every Python installation carries,
   read deterministically (stdlib files in sorted order, no tests, no site-packages):
   ``stdlib_source``, each module's source text (code, comments and docstrings; about 12 MB,
   700 documents, 3.3M tokens at ``vocab_size`` 4096 on Python 3.11), or ``stdlib_docstrings``,
   the module/class/function docstrings of at least ``min_doc_chars`` characters parsed with
   :mod:`ast`, de-duplicated (about 1.6 MB, 4.4k documents). The default is the source: on the
   docstrings every model size levels off near 4.0 nats of validation loss within two epochs and
   then overfits (a 1-11M-parameter model has more capacity than 0.45M tokens need), so a larger
   donor cannot be better there; on the source it can (``benchmarks/README.md``, donor recipes).
2. **Tokenizer**: byte-level BPE (the ``tokenizers`` library), ``vocab_size`` tokens with
   ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, trained on the training documents only and saved as
   a transformers ``PreTrainedTokenizerFast``.
3. **Donors**: Llama-3-like shapes at toy size (GQA; the same head_dim and KV-head count in both
   donors; the large one wider and deeper), each pre-trained briefly on the training documents.
   The validation documents (:func:`splitllama.training.data.in_validation`) are never seen.

Everything lands in ``<cache_dir>/embedded/<recipe key>/`` with a manifest of SHA-256 hashes;
a later run verifies the manifest and reuses the donors, a corrupt or truncated cache is
rebuilt. A file lock keeps parallel runs (a Hydra multirun) from building twice.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Bump when the recipe's code changes in a way that changes what it builds.
RECIPE_VERSION = 1
CORPUS_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"})


def default_cache_dir() -> Path:
    """``$SPLITLLAMA_CACHE`` if set, else ``~/.cache/splitllama``."""
    return Path(os.environ.get("SPLITLLAMA_CACHE") or Path.home() / ".cache" / "splitllama").expanduser()


# --------------------------------------------------------------------------------------------- corpus
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)


def stdlib_sources(paths: Iterable[Path] | None = None) -> Iterator[tuple[Path, str]]:
    """``(path, source text)`` of each standard-library file that reads as UTF-8: the one reading
    rule of the ``stdlib_source`` corpus (whose documents are these texts) and of whatever must
    know which file a document came from (the downstream tasks' held-out items)."""
    for path in stdlib_files() if paths is None else paths:
        try:
            yield path, path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def collect_stdlib_source(min_chars: int = 80, *, progress: bool = True) -> list[str]:
    """Each standard-library module's source text (UTF-8; at least ``min_chars`` characters), in a deterministic order."""
    from tqdm.auto import tqdm

    files = tqdm(stdlib_files(), desc="corpus: stdlib source", unit="file", disable=not progress)
    return [text for _, text in stdlib_sources(files) if len(text) >= min_chars]


def collect_stdlib_docstrings(min_chars: int = 80, *, progress: bool = True) -> list[str]:
    """Module, class and function docstrings of the standard library, in a deterministic order."""
    from tqdm.auto import tqdm

    documents: list[str] = []
    seen: set[str] = set()
    for path in tqdm(stdlib_files(), desc="corpus: stdlib docstrings", unit="file", disable=not progress):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    documents.append(doc)
    return documents


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: corpus name -> the function that collects it (``EmbeddedRecipe.corpus``, ``data.source``)
CORPORA = {"stdlib_source": collect_stdlib_source, "stdlib_docstrings": collect_stdlib_docstrings}


def _corpus_key(min_chars: int, corpus: str = "stdlib_docstrings") -> str:
    ident = {"version": CORPUS_VERSION, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "min_chars": min_chars}
    if corpus != "stdlib_docstrings":  # the docstrings' key predates the choice; keep their cached files valid
        ident["corpus"] = corpus
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_stdlib_corpus(
    cache_dir: str | os.PathLike[str] | None = None, min_chars: int = 80, *, corpus: str = "stdlib_docstrings", progress: bool = True
) -> list[str]:
    """A standard-library corpus (:data:`CORPORA`), cached as JSON under ``<cache_dir>/corpus/`` (verified by hash)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r}: unknown; one of {', '.join(CORPORA)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "corpus" / f"{corpus.replace('_', '-')}-{_corpus_key(min_chars, corpus)}.json"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == _sha256_file(path):
        return json.loads(path.read_text(encoding="utf-8"))
    documents = CORPORA[corpus](min_chars, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(documents), encoding="utf-8")
    os.replace(tmp, path)
    sidecar.write_text(_sha256_file(path))
    return documents


# --------------------------------------------------------------------------------------------- tokenizer
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


# --------------------------------------------------------------------------------------------- recipe
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
    batch_size: int = 16
    val_fraction: float = 0.05
    min_doc_chars: int = 80
    #: which standard-library text the tokenizer and both donors learn (:data:`CORPORA`)
    corpus: str = "stdlib_source"
    seed: int = 0
    #: validation blocks the build scores each donor on (``None``: all of them)
    eval_blocks: int | None = None
    #: also score each donor every this many pre-training steps (``None``: only at the end); the
    #: manifest keeps the curve, which is how a recipe's step counts are chosen
    eval_every: int | None = 400
    small: DonorRecipe = field(default_factory=lambda: DonorRecipe(32, 2, 1, 1, 32, 112, pretrain_steps=1600, lr=1e-2, warmup_steps=160))
    large: DonorRecipe = field(default_factory=lambda: DonorRecipe(256, 4, 8, 2, 32, 896, pretrain_steps=1600, lr=2e-3, warmup_steps=160))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmbeddedRecipe:
        values = dict(values)
        small = DonorRecipe(**values.pop("small")) if "small" in values else cls().small
        large = DonorRecipe(**values.pop("large")) if "large" in values else cls().large
        return cls(**values, small=small, large=large)

    def key(self) -> str:
        ident = {"version": RECIPE_VERSION, "corpus": _corpus_key(self.min_doc_chars, self.corpus), "recipe": asdict(self)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def llama_config(self, which: str) -> Any:
        """The ``LlamaConfig`` of the ``small`` or ``large`` donor (no weights needed)."""
        from .configuration_split_llama import llama_config

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


# --------------------------------------------------------------------------------------------- pretraining
def _lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate_lm(model: Any, blocks: Any, batch_size: int = 16) -> float:
    """Mean next-token loss of a causal LM over token blocks (every predicted token weighted equally)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk in blocks.split(batch_size):
            chunk = chunk.to(device)
            loss = model(input_ids=chunk, labels=chunk).loss
            n = chunk.shape[0] * (chunk.shape[1] - 1)
            total += loss.item() * n
            count += n
    model.train(was_training)
    return total / count


def pretrain_donor(
    config: Any, blocks: Any, recipe: DonorRecipe, *, batch_size: int, seed: int, desc: str, progress: bool = True,
    val_blocks: Any | None = None, eval_every: int | None = None, curve: list[tuple[int, float, float]] | None = None,
) -> Any:
    """Train a fresh ``LlamaForCausalLM`` for ``recipe.pretrain_steps`` AdamW steps on ``blocks``.

    With ``val_blocks`` and ``eval_every``, appends ``(step, validation loss, seconds of training
    so far)`` to ``curve`` every ``eval_every`` steps: the loss-vs-steps record of the recipe.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    steps = recipe.pretrain_steps
    warmup = recipe.warmup_steps if recipe.warmup_steps is not None else max(1, steps // 10)
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    trained_s, started = 0.0, time.perf_counter()
    for step in bar:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        batch, order = blocks[order[:batch_size]].to(device), order[batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, recipe.lr, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if curve is not None and val_blocks is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            trained_s += time.perf_counter() - started
            curve.append((step + 1, evaluate_lm(model, val_blocks), round(trained_s, 2)))
            started = time.perf_counter()
    return model.cpu().eval()


# --------------------------------------------------------------------------------------------- cache
def _manifest_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"sha256": _sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def verify_cache(path: str | os.PathLike[str]) -> list[str]:
    """Problems with a built donor directory (empty list: intact). Checks every file's size and hash."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest_path} unreadable: {exc}"]
    problems = []
    for rel, meta in files.items():
        file = root / rel
        if not file.is_file():
            problems.append(f"{file} missing")
        elif file.stat().st_size != meta["size"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, manifest says {meta['size']}")
        elif _sha256_file(file) != meta["sha256"]:
            problems.append(f"{file} content does not match its SHA-256 in the manifest")
    return problems


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_embedded_donors(recipe: EmbeddedRecipe, out_dir: Path, cache_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Build tokenizer and both donors into ``out_dir``; returns the manifest's metrics."""
    import torch

    from .training.data import packed_splits, split_documents

    timings: dict[str, float] = {}
    start = time.perf_counter()
    documents = load_stdlib_corpus(cache_dir, recipe.min_doc_chars, corpus=recipe.corpus, progress=progress)
    train_docs, val_docs = split_documents(documents, recipe.val_fraction)
    timings["corpus_s"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size, progress=progress)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    # the same cache a run's data module reads: a first run tokenises its corpus once, here
    train_blocks, val_blocks = packed_splits(tokenizer, documents, recipe.seq_len, recipe.val_fraction, cache_dir=cache_dir)
    timings["tokenizer_s"] = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "documents": len(documents), "train_documents": len(train_docs), "val_documents": len(val_docs),
        "corpus_chars": sum(map(len, documents)), "train_tokens": train_blocks.numel(), "val_tokens": val_blocks.numel(),
    }
    for index, (which, dirname) in enumerate((("small", "small"), ("large", "large"))):
        donor: DonorRecipe = getattr(recipe, which)
        start = time.perf_counter()
        curve: list[tuple[int, float, float]] = []
        model = pretrain_donor(
            recipe.llama_config(which), train_blocks, donor, batch_size=recipe.batch_size, seed=recipe.seed + index,
            desc=f"pretraining {which} donor (h={donor.hidden_size}, {donor.num_layers} layers)", progress=progress,
            val_blocks=val_blocks[: recipe.eval_blocks], eval_every=recipe.eval_every, curve=curve,
        )
        elapsed = time.perf_counter() - start
        timings[f"pretrain_{which}_s"] = elapsed
        metrics[f"{which}_tokens_per_s"] = donor.pretrain_steps * recipe.batch_size * recipe.seq_len / elapsed
        metrics[f"{which}_val_loss"] = evaluate_lm(model, val_blocks[: recipe.eval_blocks])
        if recipe.eval_every:
            metrics[f"{which}_val_curve"] = [{"step": s, "val_loss": v, "train_s": t} for s, v, t in curve]
        metrics[f"{which}_parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out_dir / dirname)
        tokenizer.save_pretrained(out_dir / dirname)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    metrics["timings"] = timings
    return metrics


def ensure_embedded_donors(
    recipe: EmbeddedRecipe | None = None, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> EmbeddedDonors:
    """The embedded donors for ``recipe``: from the cache if intact, else built (a few minutes on CPU)."""
    recipe = recipe or EmbeddedRecipe()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = recipe.key()
    root = cache / "embedded" / key
    with _file_lock(cache / "embedded" / f"{key}.lock"):
        built_now = False
        problems = verify_cache(root) if root.exists() else ["not built yet"]
        if problems:
            if root.exists():
                logger.warning("embedded donor cache %s is damaged, rebuilding: %s", root, "; ".join(problems[:3]))
                shutil.rmtree(root)
            logger.info("building the embedded donors into %s (recipe %s)", root, key)
            tmp = root.with_name(f"{key}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            metrics = build_embedded_donors(recipe, tmp, cache, progress=progress)
            import tokenizers
            import torch
            import transformers

            manifest = {
                "key": key, "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
                "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "files": _manifest_files(tmp),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, root)
            built_now = True
        manifest = json.loads((root / "manifest.json").read_text())
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, built_now)


__all__ = [
    "DonorRecipe",
    "EmbeddedDonors",
    "EmbeddedRecipe",
    "CORPORA",
    "collect_stdlib_docstrings",
    "collect_stdlib_source",
    "default_cache_dir",
    "ensure_embedded_donors",
    "evaluate_lm",
    "load_stdlib_corpus",
    "pretrain_donor",
    "train_tokenizer",
    "verify_cache",
]
