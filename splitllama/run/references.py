"""References trained alike: each donor trained on the run's own data, with the run's budget.

A split model trains on the run's data; the donors as shipped never saw it. Compared with them,
``gap_closed`` mixes two effects: what splitting buys, and what training on the run's data buys. So
for a run that trains, each donor is also trained the same way (a donor is a split of itself:
``donors.path8b = donors.path70b = <donor>``, ``adapter=identity``, ``finetune=all``), through the
run's own steps (:mod:`.checks`, :mod:`.data`, :mod:`.model`, :mod:`.trainer`): the run's documents and
validation blocks, steps, batch, sequence length, schedule, seed; all its parameters, at each
learning rate of ``eval.tuned_lr_grid``. The best grid point on the validation blocks is the
reference (choosing on them favours the reference: the conservative direction), and

    gap_closed_tuned = (small_tuned - split) / (small_tuned - large_tuned)

says whether the split beats what its donors reach with the same data and compute.

Each donor's grid is cached per (donor weights, documents, tokenizer, budget, grid):
``<cache_dir>/references/tuned-<key>.json``, so a sweep trains each donor once. The default
recipe's values ship in the embedded donors' manifest (``tuned_references``), with the command
that recomputes them (``python -m splitllama.run.references``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..errors import RunConfigError
from ..files import file_lock
from ..references import gap_closed
from .settings import cache_dir, plain, uses_embedded_donors

logger = logging.getLogger(__name__)

#: bump when what a tuned reference means changes (its training, its key)
TUNED_VERSION = 1
#: the training losses each grid point records (``first_losses``), for a quick check of a shipped value
TRACE_STEPS = 40
#: the config keys that make a run's training budget: a reference trained alike matches each
#: (which text is the documents' fingerprint in the key, wherever it was read from)
BUDGET_KEYS = (
    "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.precision",
    "data.seq_len", "data.batch_size", "data.val_fraction", "data.max_val_blocks", "optim.weight_decay", "optim.betas",
    "optim.eps", "optim.warmup_steps", "optim.min_lr_ratio", "seed", "backend.name", "backend.dtype", "parallel.devices",
    "parallel.num_nodes",
)


@dataclass
class TunedReference:
    """One donor trained alike: the best grid point's validation loss and every point's."""

    which: str
    path: str
    val_loss: float
    lr: float
    grid: dict[str, float]
    steps: int
    tokens: int
    seconds: float
    cached: str | bool = False
    key: str = ""

    def as_record(self) -> dict[str, Any]:
        """``references.<which>_tuned`` in results.json."""
        return {"val_loss": self.val_loss, "lr": self.lr, "grid": self.grid, "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds, "cached": self.cached, "path": self.path, "key": self.key}


@dataclass
class TunedReferences:
    """Both donors trained alike, and the gap a split closes between them."""

    small: TunedReference
    large: TunedReference
    notes: list[str] = field(default_factory=list)

    def gap_closed(self, split_loss: float | None) -> float | None:
        return gap_closed(split_loss, self.small.val_loss, self.large.val_loss)

    def metrics(self, val_loss: float | None) -> dict[str, float | None]:
        """``metrics.gap_closed_tuned`` of the split's loss after training."""
        return {"gap_closed_tuned": self.gap_closed(val_loss)}

    def as_record(self) -> dict[str, Any]:
        return {"small_tuned": self.small.as_record(), "large_tuned": self.large.as_record(),
                "tuned": {"enabled": True, "notes": self.notes}}

    def log_values(self) -> dict[str, float]:
        return {"ref/small_tuned_val_loss": self.small.val_loss, "ref/large_tuned_val_loss": self.large.val_loss}


def enabled(cfg: DictConfig) -> tuple[bool, str]:
    """Whether this run trains its references alike, and why (``eval.tuned_references``; ``null``: on for the
    embedded donors, off for real checkpoints, whose whole-model training can take hours)."""
    if not cfg.eval.references:
        return False, "eval.references=false"
    setting = cfg.eval.tuned_references
    if setting is None:
        if not uses_embedded_donors(cfg):
            return False, ("off by default for real checkpoints (it trains both donors whole, once per learning rate of "
                           "eval.tuned_lr_grid): eval.tuned_references=true turns it on")
        return True, "on by default for the embedded donors"
    if not setting:
        return False, "eval.tuned_references=false"
    return True, "eval.tuned_references=true"


def budget(cfg: DictConfig) -> dict[str, Any]:
    """The run's training budget (:data:`BUDGET_KEYS`), as the reference must match it."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}
    for key in BUDGET_KEYS:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = plain(value)
    return out


def cache_key(cfg: DictConfig, donor_path: str, data: Any) -> dict[str, Any]:
    """What a tuned reference depends on: the donor's weights, the run's documents and tokenizer, the budget, the grid."""
    from ..checkpoint import weights_fingerprint
    from ..data import documents_fingerprint, tokenizer_fingerprint

    return {"version": TUNED_VERSION, "donor": weights_fingerprint(donor_path), "documents": documents_fingerprint(data.documents),
            "tokenizer": tokenizer_fingerprint(data.tokenizer), "budget": budget(cfg), "grid": [float(lr) for lr in cfg.eval.tuned_lr_grid]}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def reference_config(cfg: DictConfig, donor_path: str, lr: float, output_dir: Path) -> DictConfig:
    """The run's config with ``donor_path`` as a split of itself (its first half, identity, its second half:
    the donor exactly), all parameters trainable, the LM objective, ``optim.lr=lr``; the same data, steps,
    batch, schedule and seed. Nothing of the run's is written: no references of its own, no export, no logger."""
    from transformers import AutoConfig

    from .schema import AdapterKind, ObjectiveKind

    layers = AutoConfig.from_pretrained(donor_path).num_hidden_layers
    ref = copy.deepcopy(cfg)
    ref.donors.path8b = ref.donors.path70b = donor_path
    for key in ("expect8b", "expect70b"):
        if key in ref.donors:
            ref.donors[key] = None
    ref.layers.n8, ref.layers.n70 = layers - layers // 2, layers // 2
    ref.layers.list8 = ref.layers.list70 = None
    ref.adapter.kind, ref.adapter.init, ref.adapter.checkpoint = AdapterKind.identity, None, None
    ref.finetune.trainable = ["all"]
    ref.finetune.lora.enabled = False
    ref.objective.kind, ref.objective.lm_weight, ref.objective.distill_weight = ObjectiveKind.lm, 1.0, 0.0
    ref.optim.lr = float(lr)
    ref.eval.references, ref.eval.tuned_references, ref.eval.harness.tasks = False, False, []
    ref.task.export, ref.task.eval_before, ref.task.stop_after_steps = False, False, None
    ref.paths.output_dir, ref.paths.checkpoint_dir = str(output_dir), str(output_dir / "checkpoints")
    ref.ckpt_path = None
    return ref


def train_alike(cfg: DictConfig, donor_path: str, lr: float, output_dir: Path, val_blocks: Any = None, *,
                stop_after: int | None = None) -> dict[str, Any]:
    """Train the donor at ``donor_path`` as the run would train a split, at peak learning rate ``lr``; its
    validation loss, steps, tokens, seconds and the training losses of its first :data:`TRACE_STEPS` steps
    (``first_losses``: a fingerprint of the run that a check recomputes in seconds). ``val_blocks``: the
    run's, which the reference's must equal. ``stop_after``: end after that many steps of the same schedule,
    unscored (``val_loss`` None): what such a check runs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..references import blocks_fingerprint
    from ..training.callbacks import LossTrace
    from .checks import validate
    from .data import make_datamodule
    from .donors import Donors, load_tokenizer
    from .model import make_module, model_spec
    from .trainer import final_val_loss, make_trainer, seed_everything

    ref = reference_config(cfg, donor_path, lr, output_dir)
    split = validate(ref)
    data = make_datamodule(ref, load_tokenizer(donor_path))
    data.setup("fit")
    if val_blocks is not None and blocks_fingerprint(data.val_blocks) != blocks_fingerprint(val_blocks):
        raise RunConfigError(f"eval.tuned_references: the donor {donor_path} reads the run's documents into other validation "
                             "blocks (another tokenizer?): its trained-alike loss would not be comparable; set "
                             "eval.tuned_references=false")
    seed_everything(ref.seed)
    module = make_module(ref, model_spec(ref, Donors(donor_path, donor_path), split=split), teacher_path=None)
    trainer = make_trainer(ref, [], [])
    # a reference is scored, never resumed: no checkpoints (Lightning adds a default one)
    trace = LossTrace(stop_after or TRACE_STEPS, stop=stop_after is not None)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [trace]
    start = time.perf_counter()
    module.configure_model()
    trainer.fit(module, data)
    val_loss = None if stop_after is not None else float(final_val_loss(trainer, module, data))
    return {"lr": float(lr), "val_loss": val_loss, "steps": int(trainer.global_step), "seconds": round(time.perf_counter() - start, 2),
            "tokens": int(data.batches_consumed * data.batch_size * data.seq_len * module.data_parallel_size()),
            "first_losses": trace.losses}


def shipped(key: str) -> dict[str, Any] | None:
    """The shipped result for ``key`` (the default recipe's, in the embedded donors' manifest), if any."""
    from ..embedded import SHIPPED_DONORS

    manifest = SHIPPED_DONORS / "manifest.json"
    if not manifest.is_file():
        return None
    return (json.loads(manifest.read_text()).get("tuned_references") or {}).get("results", {}).get(key)


def tuned_reference(cfg: DictConfig, which: str, donor_path: str, data: Any, work_dir: Path, *,
                    use_shipped: bool = True) -> TunedReference:
    """One donor's grid from the cache, the shipped values (``use_shipped``), or trained now (then cached)."""
    key = cache_key(cfg, donor_path, data)
    digest = key_hash(key)
    cache_file = Path(cache_dir(cfg)) / "references" / f"tuned-{digest}.json"

    def reference(result: dict[str, Any], cached: str | bool) -> TunedReference:
        best = min(result["points"], key=lambda p: p["val_loss"] if math.isfinite(p["val_loss"]) else math.inf)
        return TunedReference(which, donor_path, best["val_loss"], best["lr"], {f"{p['lr']:g}": p["val_loss"] for p in result["points"]},
                              best["steps"], best["tokens"], round(sum(p["seconds"] for p in result["points"]), 1), cached, digest)

    with file_lock(cache_file.with_suffix(".lock")):  # parallel sweep jobs: one trains, the others read
        if cache_file.is_file():
            try:
                return reference(json.loads(cache_file.read_text()), True)
            except (ValueError, KeyError):
                logger.warning("tuned reference %s unreadable, training again", cache_file)
        ship = shipped(digest) if use_shipped else None
        if ship is not None:
            return reference(ship, "shipped")
        points = []
        for lr in cfg.eval.tuned_lr_grid:
            logger.info("reference: training the %s donor alike (%d steps, lr %g)", which, cfg.trainer.max_steps, lr)
            points.append(train_alike(cfg, donor_path, lr, work_dir / f"{which}-lr{lr:g}", val_blocks=data.val_blocks))
            logger.info("reference: the %s donor trained alike at lr %g: val loss %.4f", which, lr, points[-1]["val_loss"])
        result = {"key": key, "which": which, "points": points}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, cache_file)
        return reference(result, False)


def references_trained_alike(cfg: DictConfig, record: Any, donors: Any, data: Any, *,
                              use_shipped: bool = True) -> TunedReferences | None:
    """Both donors trained alike (see the module), recorded in ``references``; ``None`` when off, and the
    record says why (``references.tuned``)."""
    on, why = enabled(cfg)
    if on and (cfg.parallel.devices != 1 or cfg.parallel.num_nodes != 1):
        on, why = False, ("not computed in a multi-process run; compute them once in one process "
                          "(the same command with parallel=single) and this run reads them from the cache")
    if not on:
        if cfg.eval.references:  # with eval.references=false the record has no references at all
            record.update("references", {"tuned": {"enabled": False, "why": why}})
        return None
    work_dir = Path(cfg.paths.output_dir) / "references"
    with record.timed("tuned_references"):
        small = tuned_reference(cfg, "small", donors.path8b, data, work_dir, use_shipped=use_shipped)
        large = tuned_reference(cfg, "large", donors.path70b, data, work_dir, use_shipped=use_shipped)
    tuned = TunedReferences(small, large)
    for ref in (small, large):
        grid = sorted(float(lr) for lr in ref.grid)
        if ref.lr in (grid[0], grid[-1]):
            tuned.notes.append(f"the {ref.which} donor's best learning rate {ref.lr:g} is at the edge of eval.tuned_lr_grid "
                               f"{grid}: a wider grid may find a better reference")
    record.update("references", tuned.as_record())
    return tuned


def main(argv: list[str] | None = None) -> int:
    """``python -m splitllama.run.references [--ship | --check] [overrides]``: the tuned references of the run
    that ``run.py <overrides>`` would make, trained now (the cache is used, the shipped values are not) and
    printed; ``--ship`` writes them into the shipped donors' manifest, where runs of that recipe read them;
    ``--check`` trains each donor's shipped best point again, here, and exits 1 unless it gives the shipped loss."""
    from hydra import compose, initialize_config_dir

    from ..results import RunRecord, register_run_dir_resolver
    from .checks import validate
    from .data import make_datamodule
    from .donors import load_tokenizer, resolve_donors
    from .schema import register_configs

    args = list(sys.argv[1:] if argv is None else argv)
    ship, check = "--ship" in args, "--check" in args
    overrides = [a for a in args if a not in ("--ship", "--check")]
    if ship and check:
        raise SystemExit("python -m splitllama.run.references: give --ship or --check, not both")
    register_configs()
    register_run_dir_resolver()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["eval.tuned_references=true", "logger=none", "eval.harness.tasks=[]", *overrides])
    work = Path(cfg.paths.cache_dir).expanduser() / "references" / "work"
    cfg.paths.output_dir, cfg.paths.checkpoint_dir = str(work), str(work / "checkpoints")
    validate(cfg)
    donors = resolve_donors(cfg)
    data = make_datamodule(cfg, load_tokenizer(donors.path8b))
    data.setup("fit")
    if check:
        problems = check_shipped(cfg, donors, data, work)
        print("\n".join(problems) if problems else "the shipped tuned references are what training gives here")
        return 1 if problems else 0
    record = RunRecord(work, task="references", config={})
    tuned = references_trained_alike(cfg, record, donors, data, use_shipped=False)
    print(json.dumps(record.data.get("references"), indent=2))
    if ship and tuned is not None:
        print(f"wrote {write_shipped(cfg, tuned, overrides)}")
    return 0


#: how far a recomputed shipped value may be: one H100 and 2 CPU cores agree to 4e-7 after 600 steps
SHIPPED_TOLERANCE = 1e-4


def check_shipped(cfg: DictConfig, donors: Any, data: Any, work_dir: Path, *, steps: int | None = None) -> list[str]:
    """Recompute each donor's shipped best grid point and compare: the validation loss after the whole run, or
    with ``steps``, the training losses of the first ``steps`` steps (``first_losses``, seconds instead of
    minutes). One line per difference beyond :data:`SHIPPED_TOLERANCE`; none when they agree."""
    problems = []
    for which, path in (("small", donors.path8b), ("large", donors.path70b)):
        digest = key_hash(cache_key(cfg, path, data))
        result = shipped(digest)
        if result is None:
            problems.append(f"{which} donor: no shipped tuned reference under key {digest} (another recipe, data or budget)")
            continue
        best = min(result["points"], key=lambda p: p["val_loss"])
        again = train_alike(cfg, path, best["lr"], work_dir / f"check-{which}", val_blocks=data.val_blocks, stop_after=steps)
        if steps is None:
            if abs(again["val_loss"] - best["val_loss"]) > SHIPPED_TOLERANCE:
                problems.append(f"{which} donor at lr {best['lr']:g}: val loss {again['val_loss']:.6f} here, {best['val_loss']:.6f} shipped")
            continue
        shipped_losses = best.get("first_losses") or []
        if len(shipped_losses) < steps:
            problems.append(f"{which} donor at lr {best['lr']:g}: the shipped record has {len(shipped_losses)} first losses, {steps} asked")
            continue
        for step, (here, there) in enumerate(zip(again["first_losses"], shipped_losses), start=1):
            if abs(here - there) > SHIPPED_TOLERANCE:
                problems.append(f"{which} donor at lr {best['lr']:g}: training loss at step {step} {here:.6f} here, {there:.6f} shipped")
                break
    return problems


def write_shipped(cfg: DictConfig, tuned: TunedReferences, overrides: list[str]) -> Path:
    """Record both donors' grids in the shipped donors' manifest (``tuned_references``), keyed like the cache,
    with the command that recomputes them and where they were computed."""
    import platform

    import torch

    from ..embedded import SHIPPED_DONORS

    manifest_path = SHIPPED_DONORS / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    section = manifest.setdefault("tuned_references", {"results": {}})
    section["command"] = "python -m splitllama.run.references --ship " + " ".join(overrides)
    section["computed_on"] = {"machine": platform.machine(), "processor": platform.processor() or None, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%d")}
    for ref in (tuned.small, tuned.large):
        cache_file = Path(cache_dir(cfg)) / "references" / f"tuned-{ref.key}.json"
        section["results"][ref.key] = json.loads(cache_file.read_text())
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest_path


__all__ = ["BUDGET_KEYS", "SHIPPED_TOLERANCE", "TRACE_STEPS", "TunedReference", "TunedReferences", "budget", "cache_key", "check_shipped", "enabled", "reference_config",
           "references_trained_alike", "train_alike", "tuned_reference", "write_shipped"]


if __name__ == "__main__":
    sys.exit(main())
