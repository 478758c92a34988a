"""``results.json``: what one run did, in one file in its run directory.

Every run writes it, successful or not, so a sweep can be analysed from files alone (a failed
job of a multirun is recorded with ``status: failed`` and its error, and the sweep goes on).

Fields: ``status`` (``ok`` | ``failed`` | ``interrupted``), ``error`` (type, message, where it
happened), ``task``, ``config`` (the resolved Hydra config), ``metrics`` (``val_loss_before``,
``val_loss``, ``val_ppl``, ``harness`` (downstream task scores per task, see :mod:`splitllama.harness`),
...), ``references`` (``harness.{small,large}``: the donors' scores on the same tasks), ``params`` (``total``, ``trainable``), ``flops``
(``train_flops_per_token``, ...), ``timings`` (seconds per phase), ``paths`` (run dir, export
dir, checkpoint, W&B run file), ``git`` (commit, dirty), ``versions``, ``started`` / ``finished``,
``attempts`` (earlier attempts in the same run directory: status, times, error, metrics, and the
file under ``results_history/`` that keeps each one's full record).

A run directory belongs to one run: :meth:`RunRecord.claim` takes it atomically (``.run_claim``,
created with ``O_EXCL``), so a second run into a used directory is refused unless it resumes it
deliberately (``ckpt_path``, or a SLURM requeue of an interrupted run), and only the task that made
the directory may resume it (:func:`resume_refusal`: ``task=assemble ckpt_path=last`` on a training
run would overwrite its trained export). A resumed attempt keeps the history: a record with
``status: ok`` is never replaced by a failed or interrupted attempt (that attempt is listed in
``attempts`` and kept in ``results_history/``), and its composed config goes beside the first
attempt's (``.hydra/attempt-<n>/``, :func:`attempt_config_subdir`), which stays as it was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
HISTORY_DIR = "results_history"
CLAIM_FILE = ".run_claim"
SCHEMA_VERSION = 1


class RunDirInUse(RuntimeError):
    """A run directory already belongs to another run; the message says how to resume or avoid it."""


def run_id() -> str:
    """The run directory's name under ``outputs/``: date/time plus a per-process random suffix
    (two runs started in the same second get distinct directories), or, in a SLURM job,
    ``slurm-<job id>-<hash of the command line>``: a requeued job reruns the same command into
    (and resumes) the directory it was preempted in, and different commands of one job script
    get their own."""
    return _run_id()


@functools.cache
def _run_id() -> str:
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun: every rank the same directory
        command = hashlib.sha1("\0".join(sys.argv[1:]).encode()).hexdigest()[:8]
        return time.strftime("%Y-%m-%d/") + f"torchrun-{elastic[:12]}-{command}"
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{task}" if task else job
        command = hashlib.sha1("\0".join(sys.argv[1:]).encode()).hexdigest()[:8]
        return f"slurm-{job}-{command}"
    return time.strftime("%Y-%m-%d/%H-%M-%S-") + secrets.token_hex(3)


def in_use_message(run_dir: Path, hint: str = "") -> str:
    """Why ``run_dir`` is taken: the run its results.json records, or the run its claim file names."""
    results, claim = run_dir / RESULTS_FILE, run_dir / CLAIM_FILE
    holder = results.exists() and read_results(results)
    if holder:
        who = f"{RESULTS_FILE} records a run with status {holder.get('status')!r} started {holder.get('started')}"
    else:
        who = f"{CLAIM_FILE} says a run holds it ({claim.read_text(errors='replace').strip() or 'still starting'})"
    return f"run directory {run_dir} is in use: {who}. A new run needs its own directory (leave hydra.run.dir to its default){hint}"


def recorded_task(run_dir: Path) -> tuple[str | None, str]:
    """The task a used run directory belongs to (from its results.json, else its claim file) and a
    description of that run for messages; ``None`` when neither says (a claim of an older version)."""
    results, claim = run_dir / RESULTS_FILE, run_dir / CLAIM_FILE
    if results.exists():
        try:
            holder = read_results(results)
        except (OSError, ValueError):
            holder = {}
        return holder.get("task"), f"a task={holder.get('task')} run with status {holder.get('status')!r} started {holder.get('started')}"
    try:
        stamp = json.loads(claim.read_text())
    except (OSError, ValueError):
        stamp = {}
    return stamp.get("task"), f"a task={stamp.get('task')} run started {stamp.get('started')}"


def resume_refusal(run_dir: Path, task: str) -> str | None:
    """Why ``task`` may not resume the used ``run_dir`` (``None``: it may): a run directory belongs to
    the task that made it; another task would write its own outputs (an untrained ``hf_model/``, its
    results.json) over that run's."""
    if not ((run_dir / RESULTS_FILE).exists() or (run_dir / CLAIM_FILE).exists()):
        return None
    owner, who = recorded_task(run_dir)
    if owner is None or owner == task:
        return None
    return (f"run directory {run_dir} belongs to {who}; task={task} may not resume it (only task={owner} may, with "
            f"ckpt_path=last). Run task={task} in a new directory (leave hydra.run.dir to its default)")


#: where a resumed attempt's composed config goes, under the run directory (the first attempt's stays in ``.hydra/``)
HYDRA_SUBDIR = ".hydra"


def attempt_config_subdir(run_dir: Path) -> str:
    """``hydra.output_subdir`` for an attempt in ``run_dir``: ``.hydra`` for the first, ``.hydra/attempt-<n>``
    (n = 2, 3, ...) for each later one, so every attempt keeps the config and overrides it ran with."""
    first = run_dir / HYDRA_SUBDIR
    if not (first / "config.yaml").exists():
        return HYDRA_SUBDIR
    n = 2
    while (first / f"attempt-{n}").exists():
        n += 1
    return f"{HYDRA_SUBDIR}/attempt-{n}"


def resumes_run(ckpt_path: Any) -> bool:
    """Whether a run may take a used run directory: a deliberate resume (``ckpt_path``), or a SLURM
    job requeued after preemption, rerunning the same command into the same directory."""
    return ckpt_path is not None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _hydra_callback_base() -> type:
    from hydra.experimental.callback import Callback

    return Callback


class RunDirGuard(_hydra_callback_base()):  # type: ignore[misc]
    """Hydra callback (``conf/hydra/default.yaml``): refuse a used run directory before Hydra writes
    its ``.hydra/`` files and ``run.log`` into it, so a refused run leaves the directory as it was; a
    resume (of the task that made it) writes its composed config to ``.hydra/attempt-<n>/``
    (:func:`attempt_config_subdir`). ``run.py`` still claims the directory atomically (two runs racing
    for a fresh one)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import read_write

        run_dir = Path(config.hydra.run.dir)
        if not is_first_rank():
            return
        name = config.task.name
        task = getattr(name, "name", str(name))  # the schema's TaskName
        if not resumes_run(config.get("ckpt_path")):
            if (run_dir / RESULTS_FILE).exists() or (run_dir / CLAIM_FILE).exists():
                hint = ", or resume it with ckpt_path=last" if task == "train" else ""
                raise SystemExit(f"error: {in_use_message(run_dir, hint)}")
            return
        refusal = resume_refusal(run_dir, task)
        if refusal:
            raise SystemExit(f"error: {refusal}")
        if config.hydra.output_subdir == HYDRA_SUBDIR:
            with read_write(config.hydra):
                config.hydra.output_subdir = attempt_config_subdir(run_dir)


def is_first_rank() -> bool:
    """True unless this process is a later rank of a distributed run: Lightning's own processes
    (``LOCAL_RANK`` / ``NODE_RANK``), torchrun's (``RANK``) or a SLURM job's tasks (``SLURM_PROCID``
    when the job runs several tasks, one rank each). Only the first rank claims the run directory
    and writes ``results.json``."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(key, "0") not in ("", "0"):
            return False
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID", "0") not in ("", "0"):
        return False
    return True


def register_run_dir_resolver() -> None:
    """``${run_id:}`` for ``conf/hydra/default.yaml`` (once per process; see :func:`run_id`)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id)


class RunSignals:
    """SIGINT and SIGTERM for ``run.py``: remember which arrived; stop cleanly during training.

    Outside training a signal interrupts at once (``KeyboardInterrupt``). During training the
    first one asks :class:`GracefulStop` to checkpoint and stop after the current step (SLURM
    sends SIGTERM some time before it kills a job); a second SIGINT interrupts at once.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.fitting = False
        #: where and at which step training stopped with a checkpoint on the signal (GracefulStop)
        self.checkpoint: str | None = None
        self.step: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        again = self.received is not None
        self.received = self.received or name
        if not self.fitting or (again and signum == signal.SIGINT):
            raise KeyboardInterrupt(name)
        logger.warning("%s: stopping after this training step with a checkpoint%s", name,
                       " (Ctrl-C again to stop now)" if signum == signal.SIGINT else "")


class RunInterrupted(BaseException):
    """Training stopped on a signal after a checkpoint (run.py records ``status: interrupted``)."""


def git_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Commit and dirty flag of the git work tree holding ``path`` (``None`` values outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # tensors / numpy scalars
        return _jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def outcome_line(data: dict[str, Any]) -> str | None:
    """The run's outcome in one line, the last a run logs: the split's validation loss between its
    donors' (scored on the same blocks), the gap it closed, and what it costs against the large donor.
    ``None`` when the run measured no split loss or has no references."""
    metrics, references = data.get("metrics", {}), data.get("references") or {}
    split, gap = metrics.get("val_loss"), metrics.get("gap_closed")
    small, large = (references.get(k, {}).get("val_loss") for k in ("small", "large"))
    if split is None or small is None or large is None:
        return None
    if gap is None:
        where = "no gap to close"
    elif gap < 0:
        where = "worse than its small donor"
    elif gap > 1:
        where = "better than its large donor"
    else:
        where = "between its donors"
    line = f"validation loss: small donor {small:.3f} | split {split:.3f} | large donor {large:.3f}: {where}"
    if gap is not None:
        line += f", gap closed {gap:+.2f} (0 = small, 1 = large)"
    fraction = (data.get("flops") or {}).get("fraction_of_large_donor")
    if fraction is not None:
        line += f"; the split's training FLOPs per token are {fraction:.2f}x the large donor's"
    return line


class RunRecord:
    """Collects a run's results as it goes and writes ``results.json`` (atomically) at the end."""

    def __init__(self, run_dir: str | os.PathLike[str], *, task: str, config: dict[str, Any], repo_dir: str | os.PathLike[str] = ".") -> None:
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "task": task,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": config,
            "metrics": {},
            "params": {},
            "flops": {},
            "timings": {},
            "paths": {"run_dir": str(self.run_dir.resolve())},
            "git": git_info(repo_dir),
            "versions": _versions(),
        }
        self._t0 = time.perf_counter()
        #: the record of the attempt before this one in the same run directory (a resume)
        self.previous: dict[str, Any] | None = None
        self._archived: dict[int, str] = {}  # record -> its results_history file (written once per attempt)

    def claim(self, *, resume: bool, hint: str = "") -> None:
        """Take the run directory for this run, atomically; a used one only when ``resume`` is true.

        Raises :class:`RunDirInUse` (naming the directory and the run that holds it) otherwise.
        On a resume the earlier record is kept (``self.previous``) and its ``val_loss_before``
        carried over, since a resumed run does not measure it again.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        claim = self.run_dir / CLAIM_FILE
        results = self.run_dir / RESULTS_FILE
        stamp = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.data["started"], "task": self.data["task"]})
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None and not results.exists():
            with os.fdopen(fd, "w") as f:
                f.write(stamp)
            return
        if fd is not None:
            os.close(fd)
        holder = results.exists() and read_results(results)
        if not resume:
            raise RunDirInUse(in_use_message(self.run_dir, hint))
        refusal = resume_refusal(self.run_dir, self.data["task"])
        if refusal:
            raise RunDirInUse(refusal)
        claim.write_text(stamp)
        if holder:
            self.previous = holder
            before = holder.get("metrics", {}).get("val_loss_before")
            if before is not None:
                self.data["metrics"].setdefault("val_loss_before", before)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall time of a phase under ``timings[name + '_s']``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data["timings"][f"{name}_s"] = round(time.perf_counter() - start, 3)

    def update(self, section: str, values: dict[str, Any]) -> None:
        self.data.setdefault(section, {}).update(values)

    def fail(self, error: BaseException) -> None:
        self.data["status"] = "failed"
        tb = traceback.extract_tb(error.__traceback__)
        self.data["error"] = {
            "type": type(error).__name__,
            "message": str(error),
            "where": f"{tb[-1].filename}:{tb[-1].lineno}" if tb else None,
        }

    def write(self, status: str | None = None) -> Path:
        if status is not None:
            self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.data["timings"]["total_s"] = round(time.perf_counter() - self._t0, 3)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RESULTS_FILE
        if self.previous is None:
            _write_json(path, self.data)
            return path
        # a resume: keep every attempt; an ok record is not replaced by a failed or interrupted one
        attempts = list(self.previous.get("attempts", []))
        if self.previous.get("status") == "ok" and self.data["status"] != "ok":
            _write_json(path, {**self.previous, "attempts": [*attempts, self._archive(self.data)]})
        else:
            _write_json(path, {**self.data, "attempts": [*attempts, self._archive(self.previous)]})
        return path

    def _archive(self, record: dict[str, Any]) -> dict[str, Any]:
        """Keep ``record`` as ``results_history/attempt-<n>.json``; return its summary for ``attempts``."""
        history = self.run_dir / HISTORY_DIR
        history.mkdir(exist_ok=True)
        key = id(record)
        if key not in self._archived:
            self._archived[key] = f"{HISTORY_DIR}/attempt-{len(list(history.glob('attempt-*.json'))) + 1}.json"
        name = self._archived[key]
        _write_json(self.run_dir / name, {k: v for k, v in record.items() if k != "attempts"})
        summary = {k: record.get(k) for k in ("status", "started", "finished", "error") if record.get(k) is not None}
        return {**summary, "metrics": record.get("metrics", {}), "record": name}


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A binary file to write ``path`` through: a temporary file beside it, flushed to disk and renamed to
    ``path`` when complete, so a reader (or a crash) never sees half a file. On any failure (a full disk:
    ENOSPC, at a write or at the flush) the temporary file is removed: nothing partial or stray is left,
    and the space it took is free again (for results.json to record the failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(_jsonable(data), indent=2).encode())


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "splitllama"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return versions


def split_summary(config: Any) -> dict[str, Any]:
    """The resolved layout of a :class:`~splitllama.SplitLlamaConfig`, as results.json records it
    (``layers.n8`` may be unset in the run config: this is what the run actually used)."""
    return {
        "n8": config.num_layers_8, "n70": config.num_layers_70, "layers_8": list(config.layers_8),
        "layers_70": list(config.layers_70), "adapter": config.adapter, "hidden_8": config.hidden_size_8,
        "hidden_70": config.hidden_size_70,
    }


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a run's ``results.json`` (give the file or its run directory)."""
    path = Path(path)
    return json.loads((path / RESULTS_FILE if path.is_dir() else path).read_text())


__all__ = ["CLAIM_FILE", "HISTORY_DIR", "HYDRA_SUBDIR", "RESULTS_FILE", "atomic_write", "attempt_config_subdir", "outcome_line", "resume_refusal", "RunDirInUse", "RunInterrupted", "RunRecord", "RunSignals", "git_info", "read_results",
           "register_run_dir_resolver", "run_id", "split_summary"]
