"""``results.json``: what one run did, in one file in its run directory.

Every run writes it, successful or not, so a sweep can be analysed from files alone (a failed
job of a multirun is recorded with ``status: failed`` and its error, and the sweep goes on).

Fields: ``status`` (``ok`` | ``failed`` | ``interrupted``), ``error`` (type, message, where it
happened), ``task``, ``config`` (the resolved Hydra config), ``metrics`` (``val_loss_before``,
``val_loss``, ``val_ppl``, ``harness`` (downstream task scores per task, see :mod:`splitllama.harness`),
...), ``references`` (``harness.{small,large}``: the donors' scores on the same tasks), ``params`` (``total``, ``trainable``), ``flops``
(``train_flops_per_token``, ...), ``timings`` (seconds per phase), ``paths`` (run dir, export
dir, checkpoint, W&B run file), ``git`` (commit, dirty), ``versions``, ``started`` / ``finished``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1


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
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=2))
        os.replace(tmp, path)
        return path


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


__all__ = ["RESULTS_FILE", "RunRecord", "git_info", "read_results", "split_summary"]
