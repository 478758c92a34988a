"""``python run.py ...`` as its own process, forked from one that has already imported what run.py imports.

A fresh run.py process spends about 7 s of CPU importing torch, transformers, Lightning and Hydra before it
reads its first override, and the suite starts about twenty of them (test_run.py's seven that do: 93 s with
fresh interpreters, 44 s forked, one pytest process on an idle machine). A test process starts one *warm* server (:class:`WarmRunPy`) that imports those
modules once. Each run is then a fork of the server: its own process, session and process group, with the
test's argv, environment and working directory, stdin/stdout/stderr as the test gave them, and run.py
executed as ``__main__`` (``runpy``), so Hydra composes ``conf/`` next to it and parses the overrides as it
parses a user's. What the process boundary is there for still holds: the exit status (``sys.exit``'s code,
an uncaught exception's 1 with its traceback on stderr, a signal's), signals sent to the process, and ``atexit``
hooks (W&B's teardown) on the way out. The ranks Lightning starts (``[sys.executable, run.py, ...]``, with the
rank in the environment) are runs of the same server: a run's ``sys.executable`` is a small shell script,
:data:`RANK_PYTHON`, that hands ``<python> .../run.py ...`` to a client of this server (another fork: about
7 s of imports less per rank), and so are submitit's local jobs (``-u -m submitit.core._submit``); anything else
goes to the real interpreter. The rank's client is in the run's process group, so a run stopped or killed takes
its ranks with it, as Lightning's own children would go.

What a fork cannot give: a module's import-time reading of the environment happens once, in the server,
with the test process's environment. The server therefore imports only libraries, never run.py or
splitllama's run modules' import-time state; tests that are about start-up itself (imports, the first run)
start their own command (the README's, the first run), and ``SPLITLLAMA_TESTS_COLD=1`` starts every run fresh.

The test holds a small client process (``python -S warm_run_py.py client``: standard library only, ~20 ms)
in place of ``python run.py``: it hands its stdio to the server, forwards the signals a test or a
scheduler sends (SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGHUP; SIGABRT to the run's whole process group, as a
time-out's stack dump wants), and ends as the run ended. When the client dies (SIGKILL), the server kills
the run's process group.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import sys

#: what run.py and its tasks import, imported once by the server (libraries and splitllama's modules; run.py
#: itself is executed fresh in every run)
PRELOAD = ("torch", "transformers", "lightning.pytorch", "hydra", "omegaconf", "wandb", "splitllama", "splitllama.results",
           "splitllama.run.schema", "splitllama.run.outcome", "splitllama.run.fit", "splitllama.run.model",
           "splitllama.run.references", "splitllama.run.resume", "splitllama.run.setup", "splitllama.run.trainer",
           "splitllama.run.export", "splitllama.run.downstream", "splitllama.training.callbacks")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

#: the ``sys.executable`` of every run: ``<it> <path>/run.py ARGS`` (how Lightning starts the other ranks) and
#: ``<it> -u -m submitit.core._submit FOLDER`` (how submitit's local executor starts a sweep's job, which runs run.py's
#: task) become warm runs of this server, any other command the real interpreter's. Written beside the socket by
#: :func:`serve`.
RANK_PYTHON = """#!/bin/sh
case "$1" in
  */run.py) exec {python} -S {script} client {socket} "$@" ;;
esac
case "$1 $2 $3" in
  "-u -m submitit.core._submit") exec {python} -S {script} client {socket} "$@" ;;
esac
exec {python} "$@"
"""


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket, buffer: bytearray) -> dict | None:
    while b"\n" not in buffer:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


# --------------------------------------------------------------------------------------------------- the run


def _run(request: dict, executable: str) -> None:
    """In the forked child: become the run's process (session, stdio, cwd, environment, argv, ``sys.executable``
    the :data:`RANK_PYTHON` script ``executable``), run the script (run.py), or ``-m MODULE``, as ``__main__``
    (``-u`` first: unbuffered output) and end as the interpreter would; never returns."""
    import atexit
    import runpy
    import threading
    import traceback

    code = 1
    try:
        try:
            os.setsid()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            argv = list(request["argv"])
            sys.executable = executable
            if argv[:1] == ["-u"]:  # python -u: stdout and stderr unbuffered
                argv = argv[1:]
                for stream in (sys.stdout, sys.stderr):
                    stream.reconfigure(line_buffering=True, write_through=True)
            if argv[:1] == ["-m"]:  # python -m MODULE ARGS: sys.argv[0] becomes the module's file, as runpy sets it
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = argv
                runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits 1
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # an uncaught exception: its traceback, status 1
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, then atexit, as at the end of a script
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the status
                pass
        os._exit(code)


# --------------------------------------------------------------------------------------------------- server


def serve(path: str) -> None:
    """Import :data:`PRELOAD`, listen on the unix socket ``path`` and fork one run per connection (one thread:
    a fork from a process with other Python threads could copy a held lock)."""
    import gc
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()  # the preloaded objects stay shared with every fork (no collector writes to their pages)
    executable = os.path.join(os.path.dirname(os.path.abspath(path)), "rank_python")
    with open(executable, "w") as f:
        f.write(RANK_PYTHON.format(python=shlex.quote(sys.executable), script=shlex.quote(os.path.abspath(__file__)),
                                   socket=shlex.quote(os.path.abspath(path))))
    os.chmod(executable, 0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    parent = os.getppid()
    print("ready", flush=True)
    runs: dict[socket.socket, int] = {}  # client connection -> the run's pid
    while os.getppid() == parent:  # a test process that dies without stopping its server does not leave it running
        readable, _, _ = select.select([listener, *runs], [], [], 0.05)
        for conn in readable:
            if conn is listener:
                client, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(client, 1 << 20, 3)
                request = json.loads(message)
                sys.stdout.flush(), sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in runs:
                        other.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    client.close()
                    _run(request, executable)  # the server never changes a signal's handler: the run's are a fresh interpreter's
                for fd in fds:
                    os.close(fd)
                _send(client, {"pid": pid})
                runs[client] = pid
            else:  # a client sends nothing after its request: readable means it is gone, and so goes the run, with its ranks
                try:
                    conn.recv(4096)
                except OSError:
                    pass
                try:
                    os.killpg(runs[conn], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                conn.close()
                runs.pop(conn)  # its status comes to waitpid below, with nobody to tell
        while True:  # every run that ended: its status to its client
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for conn, run_pid in list(runs.items()):
                if run_pid == pid:
                    try:
                        _send(conn, {"status": status})
                    except OSError:
                        pass
                    conn.close()
                    runs.pop(conn)
    os._exit(0)  # no interpreter teardown: nothing to flush, and the frozen heap would only be walked to be freed


# --------------------------------------------------------------------------------------------------- client


def client(path: str, request: dict) -> None:
    """Stand in for ``python run.py``: the run gets this process's stdio; signals go on to it; exit as it did."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    buffer = bytearray()
    reply = _receive(conn, buffer)
    if reply is None:
        sys.exit("warm run.py: the server closed the connection before the run started")
    pid = reply["pid"]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def dump_stacks(signum: int, _frame: object) -> None:  # a time-out: every process of the run prints its stacks
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGABRT, dump_stacks)
    reply = _receive(conn, buffer)  # a forwarded signal interrupts recv, which Python retries (PEP 475)
    if reply is None:
        sys.exit("warm run.py: the server went away before the run ended")
    status = reply["status"]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "client":
        client(sys.argv[2], {"argv": sys.argv[3:], "env": dict(os.environ), "cwd": os.getcwd()})
    else:
        sys.exit(f"usage: {sys.argv[0]} serve SOCKET | client SOCKET [-u] (SCRIPT | -m MODULE) [ARG ...]")
