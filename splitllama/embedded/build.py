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
RECIPE_VERSION = 2
CORPUS_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
#: the packages of a default install whose source the default recipe's corpus reads after the stdlib
DEFAULT_CORPUS_PACKAGES: tuple[str, ...] = (
    "torch", "transformers", "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "wandb",
    "numpy", "pandas", "matplotlib", "networkx", "sympy", "datasets", "huggingface_hub", "lm_eval", "tokenizers", "safetensors", "tqdm",
    "jinja2", "yaml", "fsspec",
)
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


def collect_stdlib_source(min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None) -> list[str]:
    """Each standard-library module's source text (UTF-8; at least ``min_chars`` characters), in a deterministic order."""
    from tqdm.auto import tqdm

    files = tqdm(stdlib_files(), desc="corpus: stdlib source", unit="file", disable=not progress)
    return [text for _, text in stdlib_sources(files) if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars)]


def package_root(name: str) -> Path:
    """The directory of the installed top-level package ``name`` (in this interpreter's site-packages)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"donors.embedded.packages: {name!r} is not an installed package in this environment "
            f"({sys.executable}); install it (the default install has every package the shipped recipe names) or drop it from the recipe"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_files(name: str) -> list[Path]:
    """The ``.py`` files of an installed package (no test directories), sorted."""
    root = package_root(name)
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """The installed distribution version of each top-level package (``None`` where metadata names none)."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    versions: dict[str, str | None] = {}
    for name in packages:
        dists = owners.get(name) or []
        versions[name] = metadata.version(dists[0]) if dists else None
    return versions


def collect_python_source(
    min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None
) -> list[str]:
    """The stdlib source (:func:`collect_stdlib_source`) followed by the ``.py`` files of the installed
    ``packages`` (each sorted by path; no tests), de-duplicated, each at least ``min_chars`` and at most
    ``max_chars`` characters (generated tables and vendored bundles above it are skipped).

    Why: the stdlib source is 3.3M tokens, too little for a 10-layer donor to show its size; the
    Python source of the packages a default install brings (torch, transformers, ...) is about
    100 MB more, on every machine, offline. Validation membership stays a hash of each document's
    text (:func:`splitllama.training.data.in_validation`), so the stdlib files a run validates on
    are held out here too.
    """
    from tqdm.auto import tqdm

    documents = collect_stdlib_source(min_chars, progress=progress, max_chars=max_chars)
    seen = set(documents)
    for name in packages:
        files = tqdm(package_files(name), desc=f"corpus: {name} source", unit="file", disable=not progress)
        for _, text in stdlib_sources(files):
            if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars) and text not in seen:
                seen.add(text)
                documents.append(text)
    return documents


def collect_stdlib_docstrings(min_chars: int = 80, *, progress: bool = True, packages: Sequence[str] = (), max_chars: int | None = None) -> list[str]:
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
CORPORA = {"stdlib_source": collect_stdlib_source, "stdlib_docstrings": collect_stdlib_docstrings, "python_source": collect_python_source}


def _corpus_key(min_chars: int, corpus: str = "stdlib_docstrings", packages: Sequence[str] = (), max_chars: int | None = None) -> str:
    ident: dict[str, Any] = {"version": CORPUS_VERSION, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "min_chars": min_chars}
    if corpus != "stdlib_docstrings":  # the docstrings' key predates the choice; keep their cached files valid
        ident["corpus"] = corpus
    if packages:  # which packages, at which installed versions (a changed install is another corpus)
        ident["packages"] = package_versions(packages)
    if max_chars is not None:
        ident["max_chars"] = max_chars
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_stdlib_corpus(
    cache_dir: str | os.PathLike[str] | None = None, min_chars: int = 80, *, corpus: str = "stdlib_docstrings", progress: bool = True,
    packages: Sequence[str] = (), max_chars: int | None = None,
) -> list[str]:
    """A corpus of :data:`CORPORA`, cached as JSON under ``<cache_dir>/corpus/`` (verified by hash)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r}: unknown; one of {', '.join(CORPORA)}")
    if packages and corpus != "python_source":
        raise ValueError(f"packages={list(packages)}: only corpus='python_source' reads installed packages (corpus={corpus!r})")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "corpus" / f"{corpus.replace('_', '-')}-{_corpus_key(min_chars, corpus, packages, max_chars)}.json"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == _sha256_file(path):
        return json.loads(path.read_text(encoding="utf-8"))
    documents = CORPORA[corpus](min_chars, progress=progress, packages=packages, max_chars=max_chars)
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
    batch_size: int = 64
    val_fraction: float = 0.05
    min_doc_chars: int = 80
    #: documents longer than this are left out (generated tables, vendored bundles); ``None``: no limit
    max_doc_chars: int | None = 200_000
    #: which text the tokenizer and both donors learn (:data:`CORPORA`)
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
        corpus = _corpus_key(self.min_doc_chars, self.corpus, self.packages, self.max_doc_chars)
        ident = {"version": RECIPE_VERSION, "corpus": corpus, "recipe": asdict(self)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def corpus_documents(self, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> list[str]:
        """This machine's documents of the recipe's corpus (cached)."""
        return load_stdlib_corpus(cache_dir, self.min_doc_chars, corpus=self.corpus, progress=progress,
                                  packages=self.packages, max_chars=self.max_doc_chars)

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
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
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


def _git_commit() -> str | None:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def corpus_identity(recipe: EmbeddedRecipe, documents: Sequence[str]) -> dict[str, Any]:
    """What exactly a corpus was: its documents' SHA-256 and size, and where they were read (Python, packages)."""
    from .training.data import documents_fingerprint

    return {
        "corpus": recipe.corpus, "documents": len(documents), "chars": sum(map(len, documents)), "sha256": documents_fingerprint(documents),
        "python": sys.version.split()[0], "packages": package_versions(recipe.packages) if recipe.packages else {},
    }


def write_corpus_pack(recipe: EmbeddedRecipe, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write this machine's corpus of ``recipe`` as an xz-compressed JSON ``{identity, documents}``: the
    exact text another machine (a GPU with another Python) builds the donors from."""
    import lzma

    documents = recipe.corpus_documents(cache_dir)
    identity = corpus_identity(recipe, documents)
    with lzma.open(path, "wt", encoding="utf-8", preset=6) as handle:
        json.dump({"identity": identity, "documents": documents}, handle)
    return identity


def read_corpus_pack(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(identity, documents)`` of a pack written by :func:`write_corpus_pack`, checked against its identity."""
    import lzma

    with lzma.open(path, "rt", encoding="utf-8") as handle:
        pack = json.load(handle)
    from .training.data import documents_fingerprint

    identity, documents = pack["identity"], pack["documents"]
    if documents_fingerprint(documents) != identity["sha256"]:
        raise ValueError(f"{path}: its documents do not match the SHA-256 its identity records (a damaged corpus pack)")
    return identity, documents


def build_embedded_donors(
    recipe: EmbeddedRecipe, out_dir: Path, cache_dir: Path, *, progress: bool = True, documents: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build tokenizer and both donors into ``out_dir``; returns the manifest's metrics.

    ``documents``: the corpus to use instead of collecting this machine's (a corpus pack made elsewhere).
    Donors are saved in bfloat16, and the first ``recipe.heldout_blocks`` validation blocks are saved
    beside them (``heldout_blocks.safetensors``) with both donors' loss on them as saved.
    """
    import torch
    from safetensors.torch import save_file

    from .training.data import packed_splits, split_documents

    timings: dict[str, float] = {}
    start = time.perf_counter()
    if documents is None:
        documents = recipe.corpus_documents(cache_dir, progress=progress)
    train_docs, val_docs = split_documents(documents, recipe.val_fraction)
    timings["corpus_s"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size, progress=progress)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    # the same cache a run's data module reads: a first run tokenises its corpus once, here
    train_blocks, val_blocks = packed_splits(tokenizer, documents, recipe.seq_len, recipe.val_fraction, cache_dir=cache_dir)
    timings["tokenizer_s"] = time.perf_counter() - start
    heldout = val_blocks[: recipe.heldout_blocks].to(torch.int32).contiguous()
    save_file({"input_ids": heldout}, str(out_dir / "heldout_blocks.safetensors"))

    metrics: dict[str, Any] = {
        "documents": len(documents), "train_documents": len(train_docs), "val_documents": len(val_docs),
        "corpus_chars": sum(map(len, documents)), "train_tokens": train_blocks.numel(), "val_tokens": val_blocks.numel(),
        "heldout_blocks": int(heldout.shape[0]),
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
        if recipe.eval_every:
            metrics[f"{which}_val_curve"] = [{"step": s, "val_loss": v, "train_s": t} for s, v, t in curve]
        metrics[f"{which}_parameters"] = sum(p.numel() for p in model.parameters())
        metrics[f"{which}_non_embedding_parameters"] = sum(
            p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
        # saved in bfloat16; every score below is of the weights as saved (read back into float32)
        model.to(torch.bfloat16).save_pretrained(out_dir / dirname)
        tokenizer.save_pretrained(out_dir / dirname)
        model.float()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        metrics[f"{which}_val_loss"] = evaluate_lm(model, val_blocks[: recipe.eval_blocks])
        metrics[f"{which}_heldout_loss"] = evaluate_lm(model, heldout.long())
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    metrics["gap"] = metrics["small_val_loss"] - metrics["large_val_loss"]
    metrics["timings"] = timings
    return metrics


def write_manifest(root: Path, recipe: EmbeddedRecipe, metrics: dict[str, Any], corpus: dict[str, Any], *, key: str | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """The donors' manifest: recipe and its hash, the corpus's identity, what the build measured, how it was
    made (command, commit, device, versions), and the SHA-256 of every file beside it."""
    import tokenizers
    import torch
    import transformers

    manifest = {
        "key": key, "recipe_hash": recipe.recipe_hash(), "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
        "corpus": corpus, "metrics": metrics,
        "build": {"command": command, "commit": _git_commit(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "files": _manifest_files(root),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


#: the embedded donors built by ``python -m splitllama.embedded build --ship`` from the default recipe, shipped in the package
SHIPPED_DONORS = Path(__file__).parent / "donors" / "embedded"


def shipped_donors(recipe: EmbeddedRecipe, root: Path = SHIPPED_DONORS) -> EmbeddedDonors | None:
    """The donors shipped with the package if they were built from ``recipe`` (its :meth:`~EmbeddedRecipe.recipe_hash`),
    verified against their manifest; ``None`` for any other recipe (built and cached instead).

    Damaged shipped files are an error naming them, never a silent rebuild or wrong weights.
    """
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("recipe_hash") != recipe.recipe_hash():
        return None
    problems = verify_cache(root)
    if problems:
        raise RuntimeError(
            f"the shipped embedded donors in {root} do not match their manifest: {'; '.join(problems[:3])}; "
            "reinstall splitllama, or rebuild them with `python -m splitllama.embedded build --ship`"
        )
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, False)


def ensure_embedded_donors(
    recipe: EmbeddedRecipe | None = None, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> EmbeddedDonors:
    """The embedded donors for ``recipe``: shipped with the package (the default recipe), else from the
    cache if intact, else built (minutes to hours on a CPU, depending on the recipe) and cached."""
    recipe = recipe or EmbeddedRecipe()
    shipped = shipped_donors(recipe)
    if shipped is not None:
        return shipped
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
            documents = recipe.corpus_documents(cache, progress=progress)
            metrics = build_embedded_donors(recipe, tmp, cache, progress=progress, documents=documents)
            write_manifest(tmp, recipe, metrics, corpus_identity(recipe, documents), key=key)
            os.replace(tmp, root)
            built_now = True
        manifest = json.loads((root / "manifest.json").read_text())
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, built_now)


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """``key=value`` / ``small.lr=1e-3`` overrides of the default recipe (values parsed as YAML)."""
    import yaml

    recipe: dict[str, Any] = asdict(EmbeddedRecipe())
    for item in values:
        dotted, _, raw = item.partition("=")
        *parents, name = dotted.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        if name not in node:
            raise SystemExit(f"--set {item}: no recipe field {dotted!r} (fields: {', '.join(sorted(node))})")
        node[name] = yaml.safe_load(raw)
    return recipe


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m splitllama.embedded build|corpus|verify``: build the embedded donors from their recipe."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(
        prog="python -m splitllama.embedded",
        description="Build the embedded donors from their recipe (conf/donors/tiny.yaml = EmbeddedRecipe()), or check them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="corpus, tokenizer, both donors (bf16), held-out blocks and manifest into --out")
    build.add_argument("--out", type=Path, help="output directory (default: the package's shipped donors with --ship)")
    build.add_argument("--ship", action="store_true", help=f"write into {SHIPPED_DONORS} (the donors `python run.py` uses)")
    build.add_argument("--documents", type=Path, help="a corpus pack (`corpus --out`) made on another machine, instead of this one's corpus")
    build.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides, e.g. large.pretrain_steps=10")
    build.add_argument("--cache-dir", type=Path, default=None, help="corpus and token-block cache (default $SPLITLLAMA_CACHE)")
    corpus = sub.add_parser("corpus", help="write this machine's corpus of the recipe as a pack (to build on a GPU machine)")
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    corpus.add_argument("--cache-dir", type=Path, default=None, help="corpus cache (default $SPLITLLAMA_CACHE)")
    verify = sub.add_parser("verify", help="check a donor directory's files against its manifest")
    verify.add_argument("path", type=Path, nargs="?", default=SHIPPED_DONORS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.command == "verify":
        problems = verify_cache(args.path)
        print("\n".join(problems) if problems else f"{args.path}: every file matches manifest.json")
        return 1 if problems else 0
    recipe = EmbeddedRecipe.from_dict(_parse_set(args.set))
    if args.command == "corpus":
        identity = write_corpus_pack(recipe, args.out, args.cache_dir)
        print(json.dumps(identity, indent=2))
        return 0
    out = SHIPPED_DONORS if args.ship else args.out
    if out is None:
        parser.error("build: give --out DIR or --ship")
    cache = args.cache_dir or default_cache_dir()
    if args.documents is not None:
        identity, documents = read_corpus_pack(args.documents)
        identity = {**identity, "pack": args.documents.name}
    else:
        documents = recipe.corpus_documents(cache)
        identity = corpus_identity(recipe, documents)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    metrics = build_embedded_donors(recipe, tmp, cache, documents=documents)
    metrics["timings"]["total_s"] = time.perf_counter() - started
    command = "python -m splitllama.embedded " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    manifest = write_manifest(tmp, recipe, metrics, identity, command=command)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    m = manifest["metrics"]
    print(f"small donor: val {m['small_val_loss']:.4f} held-out {m['small_heldout_loss']:.4f}; "
          f"large donor: val {m['large_val_loss']:.4f} held-out {m['large_heldout_loss']:.4f}; gap {m['gap']:.4f} nats; "
          f"{m['timings']['total_s']:.0f} s; written to {out}")
    return 0


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
    "SHIPPED_DONORS",
    "shipped_donors",
    "write_corpus_pack",
    "read_corpus_pack",
]


if __name__ == "__main__":
    raise SystemExit(main())
