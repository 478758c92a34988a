"""Helpers for the vLLM tests: an engine host process, a local tokenizer, an OpenAI server runner."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

WORKER_SCRIPT = Path(__file__).with_name("engine_worker.py")

#: Environment of every engine the tests start. ``VLLM_CPU_CI_ENV=1`` is vLLM's own CPU-CI
#: switch: torch.compile traces the model with Dynamo but runs it eagerly (no Inductor build,
#: which takes about a minute per engine here) and the warm-up pass is skipped. The workers of a
#: TP/PP engine do not exit within vLLM's default 5 s grace period at shutdown here, so they get
#: SIGTERM after 1 s (then SIGKILL after 4 s more, as vLLM does). (SIGTERM at once, a 0 s grace
#: period, made their shutdown slower: 4 to 5.6 s against 2.7 s.)
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_CI_ENV": "1",
    "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class EngineError(RuntimeError):
    """An engine request failed in the host; the message carries its error and traceback."""


class EngineHost:
    """Client of ``engine_worker.py``: ``call(op, model, engine=..., **kwargs)`` -> result.

    ``backend_import`` is the host's first answer: the vLLM modules that importing
    ``splitllama.vllm`` and ``splitllama.vllm.loading`` brought into that fresh interpreter.
    """

    def __init__(self, log_path: Path, timeout_s: float = 400.0) -> None:
        self.log_path = log_path
        self.timeout_s = timeout_s
        read_fd, write_fd = os.pipe()
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            env={**os.environ, **ENGINE_ENV},
            text=True,
        )
        os.close(write_fd)
        self._responses = os.fdopen(read_fd, "r")
        self.backend_import: dict[str, list[str]] = self._response("start", WORKER_SCRIPT)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if not line.startswith("DEBUG"))[-6000:] if text else "(empty log)"

    def call(
        self,
        op: str,
        model: str | os.PathLike[str],
        *,
        engine: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        request = {"op": op, "model": os.fspath(model), "engine": engine or {}, "env": env or {}, "kwargs": kwargs}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._response(op, model)

    def _response(self, op: str, model: str | os.PathLike[str]) -> Any:
        ready, _, _ = select.select([self._responses], [], [], self.timeout_s)
        line = self._responses.readline() if ready else ""
        if not line:
            raise EngineError(f"engine host gave no answer to {op} on {model}; log tail:\n{self.log_tail()}")
        response = json.loads(line)
        if not response["ok"]:
            raise EngineError(f"{response['error']}\n{response['traceback']}")
        return response["result"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._responses.close()
        self._log.close()


def make_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, words ``w4``...) saved locally.

    Its ids match :func:`splitllama.configuration_split_llama.llama_config` (pad 0, bos 1, eos 2); it prepends
    ``<s>`` like LLaMA's tokenizer. Built with the ``tokenizers`` library: nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenAIServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, as a user starts it."""

    def __init__(self, model: Path, log_path: Path, args: list[str], startup_timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENGINE_ENV},
        )
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server not healthy after {startup_timeout_s} s; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if not line.startswith("DEBUG"))[-6000:]

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=60) as r:
            return json.loads(r.read())

    def post(self, route: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{route}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
