"""The warm run.py launcher the suite starts run.py with (:mod:`tests.warm_run_py`) ends, signals and sees its
environment as ``python script.py`` does, so a test that passes with it would pass with a fresh interpreter.

Each case runs a small script through the launcher's client (the server forks it as it forks run.py) and,
where the answer is not obvious, through a fresh interpreter too, and compares.

Bugs injected into a copy and caught here: the run's exit code replaced by 0 (``_run``'s ``os._exit(0)``);
``sys.exit("message")`` ending 0 without the message; atexit hooks not run; SIGTERM not forwarded (the client
exits on it, the run goes on); the run left alive when the client is killed; the environment of the server kept;
a run's ``sys.executable`` left the real interpreter's (Lightning's ranks start cold); submitit's job command not
handed to the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunPy, WarmServer


@pytest.fixture(scope="module")
def server(run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> "Iterator[WarmServer]":
    """The test process's warm server, or one of this module's own where the runs start cold (SPLITLLAMA_TESTS_COLD=1)."""
    if run_py.server is not None:
        yield run_py.server
        return
    own = WarmServer(run_py.environment(None), tmp_path_factory.mktemp("warm"))
    yield own
    own.stop()


def launch(server: WarmServer, script: Path, *args: str, env: dict[str, str] | None = None, cwd: Path,
           warm: bool = True) -> "subprocess.Popen[str]":
    launcher = server.client() if warm else [sys.executable]
    return subprocess.Popen([*launcher, str(script), *args], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


ENDINGS = {
    "returns": ("print('out')", 0, "out", ""),
    "sys.exit(3)": ("import sys; sys.exit(3)", 3, "", ""),
    "sys.exit(message)": ("import sys; sys.exit('error: no such field')", 1, "", "error: no such field"),
    "uncaught exception": ("raise ValueError('bad value')", 1, "", "ValueError: bad value"),
    "atexit": ("import atexit; atexit.register(lambda: print('atexit ran', flush=True))", 0, "atexit ran", ""),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_run_ends_as_a_fresh_interpreter_does(server: WarmServer, tmp_path: Path, ending: str) -> None:
    body, code, out, err = ENDINGS[ending]
    path = script(tmp_path, body)
    for warm in (True, False):
        proc = launch(server, path, cwd=tmp_path, warm=warm)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, (warm, stdout, stderr)
        assert out in stdout and err in stderr, (warm, stdout, stderr)
        assert ("Traceback" in stderr) is (ending == "uncaught exception"), (warm, stderr)


def test_a_run_has_its_argv_environment_directory_and_session(server: WarmServer, tmp_path: Path) -> None:
    path = script(tmp_path, """
        import json, os, sys
        print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "x": os.environ.get("SPLIT_X"),
                          "leader": os.getsid(0) == os.getpid() == os.getpgid(0)}))
    """)
    (tmp_path / "elsewhere").mkdir()
    proc = launch(server, path, "a=1", "b=two words", cwd=tmp_path / "elsewhere", env={"SPLIT_X": "42"})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    import json

    seen = json.loads(stdout)
    assert seen == {"argv": [str(path), "a=1", "b=two words"], "cwd": str(tmp_path / "elsewhere"), "x": "42", "leader": True}


def test_signals_reach_the_run_and_its_end_is_the_clients(server: WarmServer, tmp_path: Path) -> None:
    """SIGTERM sent to the client is the run's: handled, it ends as the handler says; not handled, the client
    ends by the same signal (Popen's negative return code)."""
    handled = script(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = launch(server, handled, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 7
    plain = tmp_path / "plain.py"
    plain.write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = launch(server, plain, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM


def test_killing_the_client_kills_the_run(server: WarmServer, tmp_path: Path) -> None:
    """A test's time-out ends with SIGKILL to the client's process group: the run (and its ranks) must not outlive it."""
    path = script(tmp_path, """
        import os, time
        print(os.getpid(), flush=True)
        time.sleep(120)
    """)
    proc = launch(server, path, cwd=tmp_path)
    run_pid = int(proc.stdout.readline())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(run_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"the run {run_pid} outlived its killed client")


def test_ranks_started_as_lightning_starts_them_are_warm_runs_and_other_commands_the_real_interpreter(
        server: WarmServer, tmp_path: Path) -> None:
    """Lightning starts the other ranks as ``[sys.executable, <abs>/run.py, *argv[1:]]`` with the rank in the
    environment: under the launcher that is another fork of the server (torch already imported, its own session, the
    environment it was given), a child of the run; so is a submitit local job (``-u -m submitit.core._submit``);
    ``sys.executable -c ...`` (pip, a harness CLI) is the real interpreter's."""
    rank = tmp_path / "run.py"
    rank.write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"warm": "torch" in sys.modules, "argv": sys.argv[1:], "rank": os.environ.get("LOCAL_RANK"),
                          "leader": os.getsid(0) == os.getpid()}))
    """))
    path = script(tmp_path, f"""
        import json, os, subprocess, sys
        child = subprocess.run([sys.executable, {str(rank)!r}, "a=1"], env={{**os.environ, "LOCAL_RANK": "1"}},
                               capture_output=True, text=True, check=True)
        plain = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules, sys.executable)"],
                               capture_output=True, text=True, check=True)
        import submitit

        def imported():  # what the job's process had imported before it ran this
            return "lightning.pytorch" in sys.modules, os.getpid()

        job = submitit.LocalExecutor({str(tmp_path / "jobs")!r}).submit(imported)
        print(json.dumps({{"rank": json.loads(child.stdout), "plain": plain.stdout.split(), "job": job.result(),
                          "me": os.getpid()}}))
    """)
    proc = launch(server, path, cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    import json

    seen = json.loads(stdout)
    assert seen["rank"] == {"warm": True, "argv": ["a=1"], "rank": "1", "leader": True}
    assert seen["plain"] == ["False", sys.executable]
    warm, pid = seen["job"]  # a job of submitit's local executor (a sweep's with hydra/launcher=submitit_local) is a fork too
    assert warm is True and pid != seen["me"]
