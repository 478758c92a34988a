"""``results.json``: what one run did, in one file in its run directory.

Every run writes it, successful or not, so a sweep can be analysed from files alone (a failed
job of a multirun is recorded with ``status: failed`` and its error, and the sweep goes on).

Fields: ``status`` (``ok`` | ``failed`` | ``interrupted`` | ``diverged``: the loss became non-finite,
``diverged`` records the step, the loss and the last finite one), ``error`` (type, message, where it
happened), ``warnings`` (settings that ran but defeat part of themselves, see
:func:`splitllama.run.settings.setting_warnings`), ``ran`` (what the Trainer ran with: precision, devices,
effective batch, schedule), ``task``, ``config`` (the resolved Hydra config), ``metrics`` (``val_loss_before``,
``val_loss``, ``val_ppl``, ``harness`` (downstream task scores per task, see :mod:`splitllama.harness`),
...), ``references`` (``harness.{small,large}``: the donors' scores on the same tasks), ``params`` (``total``, ``trainable``), ``flops``
(``train_flops_per_token``, ...), ``timings`` (seconds per phase), ``paths`` (run dir, export
dir, checkpoint, W&B run file), ``git`` (commit, dirty), ``versions``, ``started`` / ``finished``,
``attempts`` (earlier attempts in the same run directory: status, times, error, metrics, and the
file under ``results_history/`` that keeps each one's full record).

A run directory belongs to one run: :meth:`RunRecord.claim` takes it (:func:`claim_run_dir`: an
exclusive ``flock`` on ``.run_claim``, held while the process runs, so one live process at a time writes a
run directory, and a killed one leaves nothing held), so a second run into a used directory is refused unless it resumes it
deliberately (``ckpt_path``, or a SLURM requeue of an interrupted run), and only the task that made
the directory may resume it (:func:`resume_refusal`: ``task=assemble ckpt_path=last`` on a training
run would overwrite its trained export). A resumed attempt keeps the history: a record with
``status: ok`` is never replaced by a failed or interrupted attempt (that attempt is listed in
``attempts`` and kept in ``results_history/``), and its composed config goes beside the first
attempt's (``.hydra/attempt-<n>/``, :func:`attempt_config_subdir`), which stays as it was. What a run
writes outside its directory (``paths.export_dir``, ``paths.checkpoint_dir``) must be a place no other run's
record names (:func:`output_refusal`); such a directory carries :data:`OUTPUT_MARK`, naming its run.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
HISTORY_DIR = "results_history"
CLAIM_FILE = ".run_claim"
SCHEMA_VERSION = 1


#: in an output directory outside its run's directory (``paths.export_dir=/models/x``): the run that writes it
OUTPUT_MARK = ".splitllama_output"
#: run.py's exit status for a run whose loss became non-finite (1: failed, 130 / 143: interrupted)
DIVERGED_EXIT_STATUS = 3


class RunDirInUse(RuntimeError):
    """A run directory already belongs to another run; the message says how to resume or avoid it."""


class RunDiverged(RuntimeError):
    """Training's loss, or a checkpoint's tensors, became non-finite: the run stops, exports nothing, and run.py
    records ``status: diverged`` with :attr:`details` and exits :data:`DIVERGED_EXIT_STATUS` (a sweep's job
    returns +inf, as a failed one does). Not a failure of the code: a result of the settings (learning rate,
    warmup, precision), so it has its own status, and a sweep counts it as its worst trial."""

    def __init__(self, message: str, *, step: int | None, loss: float | None, where: str,
                 last_finite_step: int | None = None, last_finite_loss: float | None = None) -> None:
        super().__init__(message)
        #: what results.json's ``diverged`` records: the step (``trainer.global_step`` when it was found), the
        #: non-finite loss, where it was found (train | val | checkpoint) and the last finite training loss
        self.details: dict[str, Any] = {"step": step, "loss": loss, "where": where,
                                        "last_finite_step": last_finite_step, "last_finite_loss": last_finite_loss}


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


def enclosing_run(path: str | os.PathLike[str]) -> Path | None:
    """The run directory ``path`` lies in: ``path`` itself or its nearest parent that holds a ``results.json`` or
    a claim (``None``: no run's). Everything under a run directory is that run's."""
    path = Path(path).expanduser().resolve()
    for directory in (path, *path.parents):
        if (directory / RESULTS_FILE).is_file() or (directory / CLAIM_FILE).is_file():
            return directory
    return None


def _holder_stamp(claim: Path, wait_s: float = 1.0) -> dict[str, Any]:
    """The stamp a live holder of ``claim`` wrote (it writes it right after taking the lock: wait a moment for it)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stamp = json.loads(claim.read_text())
            if isinstance(stamp, dict):
                return stamp
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def live_holder_message(run_dir: Path, hint: str = "") -> str:
    """Why ``run_dir`` is refused while another process holds its lock: that process, named."""
    stamp = _holder_stamp(run_dir / CLAIM_FILE)
    who = (f"pid {stamp.get('pid')} on {stamp.get('host')}, started {stamp.get('started')}: `{stamp.get('command')}`"
           if stamp else "a process that is still starting")
    return (f"run directory {run_dir} is in use by a running process ({who}); one process at a time writes a run directory. "
            f"Wait for it to end (or stop it), then run again{hint or ''}; or give this run its own directory (leave "
            "hydra.run.dir to its default)")


@dataclass
class RunDirClaim:
    """This process's hold on a run directory (:func:`claim_run_dir`): the locked ``.run_claim`` and whether
    the directory was fresh (no earlier run's claim or results)."""

    run_dir: Path
    task: str
    resume: bool
    fd: int | None
    fresh: bool

    def release(self) -> None:
        """Drop the lock (the run has ended; a process that dies drops it too)."""
        if self.fd is not None:
            with contextlib.suppress(Exception):  # also at interpreter exit, where os may be gone
                os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a claim nobody holds any more (a record dropped in a test) holds no lock
        self.release()


#: claims taken by :class:`RunDirGuard` before Hydra writes into the directory, for :meth:`RunRecord.claim` to take over
_GUARD_CLAIMS: dict[Path, RunDirClaim] = {}


def claim_run_dir(run_dir: str | os.PathLike[str], *, task: str, resume: bool, hint: str = "",
                  started: str | None = None) -> RunDirClaim:
    """Take ``run_dir`` for this process's run, or raise :class:`RunDirInUse` saying why not and what to do.

    One writer per run: the directory must not lie inside another run's; its ``.run_claim`` is locked
    (``flock``, exclusive, for as long as this process holds the returned claim: the kernel drops it when the
    process dies, so a killed run leaves nothing held), so a second live process (a fresh run racing for the
    same directory, a second resume) is refused, naming the holder; and a used directory (an earlier run's
    claim or results.json) is taken only by a resume (``resume``) of the task that made it (:func:`resume_refusal`).
    The claim file then holds this process's stamp: pid, host, start time, command, task.
    """
    run_dir = Path(run_dir)
    outer = enclosing_run(run_dir.resolve().parent)
    if outer is not None:
        _, who = recorded_task(outer)
        raise RunDirInUse(f"run directory {run_dir} lies inside the run directory {outer} of {who}; a run's directory holds "
                          "only its own files. Give hydra.run.dir a path outside other runs' directories (or leave it to its default)")
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / CLAIM_FILE
    existed = claim.exists()
    fd = os.open(claim, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(live_holder_message(run_dir, hint)) from None
        except OSError as exc:  # a file system without locks (some network mounts): run, unguarded, and say so
            logger.warning("cannot lock %s (%s): a second process in this run directory would not be refused", claim, exc)
        fresh = os.fstat(fd).st_size == 0 and not (run_dir / RESULTS_FILE).exists()
        if not fresh:
            refusal = in_use_message(run_dir, hint) if not resume else resume_refusal(run_dir, task)
            if refusal:
                if not existed:  # an older run without a claim file: leave its directory as it was
                    with contextlib.suppress(OSError):
                        claim.unlink()
                raise RunDirInUse(refusal)
        stamp = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started or time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "task": task, "command": " ".join(sys.argv)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunDirClaim(run_dir, task, resume, fd, fresh)


def output_refusal(path: str | os.PathLike[str], run_dir: str | os.PathLike[str], key: str) -> str | None:
    """Why the run in ``run_dir`` may not write the output directory ``path`` that ``key`` sets (``None``: it may).

    A run writes inside its own directory, or into a place that no other run's record names: not its own run
    directory or a folder holding it (an export replaces its directory whole), not inside another run's
    directory, not a directory another existing run wrote (its :data:`OUTPUT_MARK`), and not a directory that
    holds files no run wrote.
    """
    given, path, run_dir = path, Path(path).expanduser().resolve(), Path(run_dir).resolve()
    default = f"leave {key} to its default (inside this run's directory {run_dir})"
    if path == run_dir or path in run_dir.parents:
        return f"{key}={given}: is this run's directory or holds it ({run_dir}), which the run's output would replace; {default}"
    if path.is_relative_to(run_dir):
        return None
    owner = enclosing_run(path)
    if owner is not None:
        _, who = recorded_task(owner)
        return (f"{key}={given}: lies in the run directory {owner} of {who}, whose files a run must not replace; a run writes "
                f"only inside its own directory or where no other run's record points. {default}, or give a new directory "
                "outside other runs' directories")
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{key}={given}: is a file, not a directory; give a new directory, or {default}"
    mark = path / OUTPUT_MARK
    if mark.is_file():
        try:
            writer = Path(json.loads(mark.read_text()).get("run_dir", ""))
        except (OSError, ValueError, AttributeError):
            writer = None
        if writer is None or writer.resolve() == run_dir:
            return None
        if (writer / RESULTS_FILE).is_file() or (writer / CLAIM_FILE).is_file():
            _, who = recorded_task(writer)
            return (f"{key}={given}: was written by the run in {writer} ({who}), which records it; give a new directory, "
                    f"or {default} (remove {path} first if that run's output may go)")
        return None  # its run directory is gone: nothing records it any more
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        return (f"{key}={given}: holds files no run wrote ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}), which "
                f"the run would replace or mix with its own; give a new or empty directory, or {default}")
    return None


def claim_output(path: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> None:
    """Mark the output directory ``path`` as the run's in ``run_dir`` (:data:`OUTPUT_MARK`, created with it) when it
    lies outside that directory, so a later run sees whose it is (:func:`output_refusal`)."""
    path, run_dir = Path(path).expanduser().resolve(), Path(run_dir).resolve()
    if path.is_relative_to(run_dir):
        return
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / OUTPUT_MARK, {"run_dir": str(run_dir)})


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
    """Hydra callback (``conf/hydra/default.yaml``): claim the run directory (:func:`claim_run_dir`: its lock
    and the checks of a used one) before Hydra writes its ``.hydra/`` files and ``run.log`` into it, so a
    refused run (a used directory, another live process in it, a race for a fresh one) leaves the directory as
    it was; a resume (of the task that made it) writes its composed config to ``.hydra/attempt-<n>/``
    (:func:`attempt_config_subdir`). ``run.py``'s :meth:`RunRecord.claim` takes this claim over."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import read_write

        run_dir = Path(config.hydra.run.dir)
        if not is_first_rank():
            return
        name = config.task.name
        task = getattr(name, "name", str(name))  # the schema's TaskName
        resume = resumes_run(config.get("ckpt_path"))
        hint = ", or resume it with ckpt_path=last" if task == "train" and not resume else ""
        try:
            held = claim_run_dir(run_dir, task=task, resume=resume, hint=hint)
        except RunDirInUse as exc:
            raise SystemExit(f"error: {exc}") from None
        stale = _GUARD_CLAIMS.pop(run_dir.resolve(), None)
        if stale is not None:
            stale.release()
        _GUARD_CLAIMS[run_dir.resolve()] = held
        if resume and config.hydra.output_subdir == HYDRA_SUBDIR:
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


class RunAlreadyComplete(Exception):
    """A resume of a run that had already finished (:func:`splitllama.run.resume.finished_run_message`): nothing is
    trained or written; run.py says so and exits 0 (a sweep's job returns the run's recorded value)."""

    def __init__(self, message: str, *, previous: dict[str, Any]) -> None:
        super().__init__(message)
        self.previous = previous


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
    With the donors trained alike (``references.small_tuned`` / ``large_tuned``): both donors as shipped and
    trained alike, both gaps, and in words whether the split beats the small donor trained alike, the
    reference that decides whether splitting bought anything. ``None`` when the run measured no split
    loss or has no references. A ``task=grpo`` run: its held-out reward and parse rate before and after
    (:func:`_grpo_outcome_line`)."""
    if data.get("task") == "grpo":
        return _grpo_outcome_line(data)
    metrics, references = data.get("metrics", {}), data.get("references") or {}
    split, gap = metrics.get("val_loss"), metrics.get("gap_closed")
    small, large = (references.get(k, {}).get("val_loss") for k in ("small", "large"))
    if split is None or small is None or large is None:
        return None
    fraction = (data.get("flops") or {}).get("fraction_of_large_donor")
    small_tuned, large_tuned = ((references.get(k) or {}).get("val_loss") for k in ("small_tuned", "large_tuned"))
    if small_tuned is not None and large_tuned is not None:
        return _outcome_line_tuned(split, small, large, small_tuned, large_tuned, gap, metrics.get("gap_closed_tuned"), fraction)
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
    if fraction is not None:
        line += f"; the split's training FLOPs per token are {fraction:.2f}x the large donor's"
    return line


def _grpo_outcome_line(data: dict[str, Any]) -> str | None:
    """``task=grpo``'s last line: the evaluation reward and the share of held-out headers that parse, before -> after,
    the parameter match, the steps, the time, and where the results lie."""
    metrics = data.get("metrics") or {}
    if not metrics.get("steps"):
        return None

    def change(before: Any, after: Any, fmt: str) -> str:
        return " -> ".join("n/a" if v is None else format(v, fmt) for v in (before, after))

    line = (f"grpo: held-out reward {change(metrics.get('eval_reward_before'), metrics.get('eval_reward_after'), '.3f')}, "
            f"headers that parse {change(metrics.get('eval_header_parses_before'), metrics.get('eval_header_parses_after'), '.0%')}, "
            f"parameter match {change(metrics.get('eval_parameter_match_before'), metrics.get('eval_parameter_match_after'), '.2f')}"
            f" over {metrics['steps']} steps")
    seconds = (data.get("timings") or {}).get("grpo_s")
    if seconds is not None:
        line += f" in {seconds / 60:.1f} min"
    if metrics.get("kl_last") is not None:
        line += f" (KL to the start {metrics['kl_last']:.3g})"
    paths = data.get("paths") or {}
    where = [f"{paths['run_dir']}/{RESULTS_FILE}"] if paths.get("run_dir") else []
    if paths.get("export_dir"):
        where.append(f"the model in {paths['export_dir']}")
    return line + (f"; {', '.join(where)}" if where else "")


def _outcome_line_tuned(split: float, small: float, large: float, small_tuned: float, large_tuned: float,
                        gap: float | None, gap_tuned: float | None, fraction: float | None) -> str:
    def signed(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    line = (f"validation loss: small donor {small:.3f} | small trained alike {small_tuned:.3f} | split {split:.3f} | "
            f"large trained alike {large_tuned:.3f} | large donor {large:.3f}; gap closed {signed(gap)} against the donors "
            f"as shipped, {signed(gap_tuned)} against the donors trained alike (0 = small, 1 = large)")
    if fraction is not None:
        line += f"; the split's training FLOPs per token are {fraction:.2f}x the large donor's"
    if split < small_tuned:
        verdict = f"the split beats the small donor trained alike ({split:.3f} < {small_tuned:.3f})"
    else:
        verdict = (f"the split does NOT beat the small donor trained alike ({split:.3f} >= {small_tuned:.3f}): "
                   "at this budget, training the small donor on the data buys more than splitting")
    return f"{line}; {verdict}"


#: the runs executing in this process: id(config) -> (config, record) (:meth:`RunRecord.executing`)
_EXECUTING: dict[int, tuple[Any, RunRecord]] = {}


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
        self._claim: RunDirClaim | None = None

    def claim(self, *, resume: bool, hint: str = "") -> None:
        """Take the run directory for this run (:func:`claim_run_dir`, or the claim :class:`RunDirGuard` took for it
        in this process); a used one only when ``resume`` is true. Held until :meth:`release`.

        Raises :class:`RunDirInUse` (naming the directory and the run, or the live process, that holds it) otherwise.
        On a resume the earlier record is kept (``self.previous``) and its ``val_loss_before``
        carried over, since a resumed run does not measure it again.
        """
        held = _GUARD_CLAIMS.pop(self.run_dir.resolve(), None)
        if held is not None and (held.task != self.data["task"] or held.resume != resume or held.fd is None):
            held.release()
            held = None
        if held is None:
            held = claim_run_dir(self.run_dir, task=self.data["task"], resume=resume, hint=hint, started=self.data["started"])
        self._claim = held
        results = self.run_dir / RESULTS_FILE
        if not held.fresh and results.exists():
            self.previous = read_results(results)
            before = self.previous.get("metrics", {}).get("val_loss_before")
            if before is not None:
                self.data["metrics"].setdefault("val_loss_before", before)

    def release(self) -> None:
        """Let go of the run directory (the run has ended): the next process may resume it."""
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def warn(self, message: str) -> None:
        """Log ``message`` and keep it in results.json's ``warnings`` (once)."""
        warnings = self.data.setdefault("warnings", [])
        if message not in warnings:
            warnings.append(message)
            logger.warning("%s", message)

    @contextlib.contextmanager
    def executing(self, config: Any) -> Iterator[None]:
        """While the run with ``config`` executes in this process, :meth:`of` finds this record from that config,
        so the steps that learn what actually runs (the Trainer's precision, devices) record it."""
        _EXECUTING[id(config)] = (config, self)
        try:
            yield
        finally:
            _EXECUTING.pop(id(config), None)

    @staticmethod
    def of(config: Any) -> RunRecord | None:
        """The record of the run executing with exactly this ``config`` object (``None``: not a run's own config,
        e.g. a reference trained alike on a copy of it)."""
        entry = _EXECUTING.get(id(config))
        return entry[1] if entry is not None and entry[0] is config else None

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


__all__ = ["CLAIM_FILE", "DIVERGED_EXIT_STATUS", "HISTORY_DIR", "HYDRA_SUBDIR", "OUTPUT_MARK", "RESULTS_FILE", "atomic_write",
           "attempt_config_subdir", "claim_output", "claim_run_dir", "enclosing_run", "live_holder_message", "outcome_line",
           "output_refusal", "resume_refusal", "RunAlreadyComplete", "RunDirClaim", "RunDirInUse", "RunDiverged", "RunInterrupted", "RunRecord",
           "RunSignals", "git_info", "read_results", "register_run_dir_resolver", "run_id", "split_summary"]
