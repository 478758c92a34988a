"""How the embedded donors are made: pre-training each donor, building the directory, and caching it.

:func:`ensure_embedded_donors` is what a run calls: the shipped donors for the default recipe, else
the cache if intact, else a build under a file lock (parallel runs of a Hydra multirun build once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..data import packed_splits, split_documents
from ..files import file_lock
from .corpus import default_cache_dir
from .pack import corpus_identity
from .recipe import (
    RECIPE_VERSION,
    DonorRecipe,
    EmbeddedDonors,
    EmbeddedRecipe,
    train_tokenizer,
)
from .verify import SHIPPED_DONORS, manifest_files, shipped_donors, verify_cache

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- pretraining
def _lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """The learning rate at ``step``: linear warmup to ``peak``, then cosine decay to ``floor * peak``."""
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


# --------------------------------------------------------------------------------------------- build and cache
def git_commit() -> str | None:
    """This checkout's commit (``-dirty`` with uncommitted changes), for the manifest's record of how donors were made."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def ship_provenance_problem(commit: str | None) -> str | None:
    """Why donors built now could not say which code made them (``None`` when they can): shipped donors
    record the commit that built them, and only a clean commit holds that code; a build from uncommitted
    changes (``-dirty``) or outside a git checkout would ship a manifest no one can trace back."""
    if commit is None:
        return "build --ship: not in a git checkout (or git is missing), so the manifest could not name the commit that built the donors; run it from a clone of the repository"
    if commit.endswith("-dirty"):
        return (f"build --ship: the checkout has uncommitted changes to tracked files (HEAD {commit.removesuffix('-dirty')[:12]}): "
                "no commit would hold the code that built the donors; commit or stash them (git status), then build again")
    return None


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
        "build": {"command": command, "commit": git_commit(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "files": manifest_files(root),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def building_into(out: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out`` (``<name>.tmp<pid>``) to build into, then ``os.replace`` onto ``out``
    inside the block. Whatever ends the block early (an error, Ctrl-C's ``KeyboardInterrupt``, SIGTERM turned into
    one) removes it: an interrupted build leaves nothing a later run must clean. What a killed build (SIGKILL, a lost
    node) left is removed before this one starts: every ``<name>.tmp*`` with ``exclusive`` (the caller holds the
    build's lock, so no other build of ``out`` runs), else those whose process is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{out.name}.tmp*"):
        pid = stale.name[len(out.name) + 4:]
        if exclusive or not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            logger.info("removing %s, left by a build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the block moved it onto out


def ensure_embedded_donors(
    recipe: EmbeddedRecipe | None = None, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
    shipped: Path = SHIPPED_DONORS,
) -> EmbeddedDonors:
    """The embedded donors for ``recipe``: shipped with the package (the default recipe; ``shipped`` is where), else
    from the cache if intact, else built (minutes to hours on a CPU, depending on the recipe) and cached. Shipped donors
    that do not match their manifest are an error (:func:`~.verify.shipped_donors`), never a build."""
    recipe = recipe or EmbeddedRecipe()
    found = shipped_donors(recipe, shipped)
    if found is not None:
        return found
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = recipe.key()
    root = cache / "embedded" / key
    with file_lock(cache / "embedded" / f"{key}.lock"):
        built_now = False
        problems = verify_cache(root) if root.exists() else ["not built yet"]
        if problems:
            if root.exists():
                logger.warning("embedded donor cache %s is damaged, rebuilding: %s", root, "; ".join(problems[:3]))
                shutil.rmtree(root)
            logger.info("building the embedded donors into %s (recipe %s)", root, key)
            with building_into(root, exclusive=True) as tmp:  # under the lock: no other build of this key runs
                documents = recipe.corpus_documents(cache, progress=progress)
                metrics = build_embedded_donors(recipe, tmp, cache, progress=progress, documents=documents)
                write_manifest(tmp, recipe, metrics, corpus_identity(recipe, documents), key=key)
                os.replace(tmp, root)
            built_now = True
        manifest = json.loads((root / "manifest.json").read_text())
    return EmbeddedDonors(root / "small", root / "large", root / "tokenizer", manifest, built_now)


__all__ = ["build_embedded_donors", "building_into", "ensure_embedded_donors", "evaluate_lm", "git_commit", "pretrain_donor", "ship_provenance_problem",
           "write_manifest"]
