"""A vLLM engine host for the tests: one process that runs engines one after another.

Why a separate process: a vLLM CPU engine run in-process binds the process's OpenMP threads to
cores and replaces ``torch.set_num_threads``; pytest's process must not inherit that. Why one
process for many engines: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs in this
process and starts in about 5 s, against about 35 s for vLLM's default three processes (front end,
engine core, worker: each imports vLLM), so the tests can afford one engine per model.

Protocol: one JSON request per line on stdin, one JSON response per line on the file descriptor
given as ``argv[1]`` (stdout and stderr carry vLLM's logs). A request names an ``op``:

- ``generate`` / ``score`` / ``token_logprobs``: the :mod:`splitllama.vllm` function of that name
  on an engine made by ``splitllama.vllm.load_llm(model, **engine)`` (kept while the next
  request names the same model and engine arguments),
- ``llm_generate``: plain ``vllm.LLM(model=..., **engine)`` and ``LLM.generate`` on token ids,
  bypassing splitllama's helpers (what a user who relies on the plugin alone does),

with optional ``env`` (environment variables set while the engine runs). Response:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "traceback": "..."}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Any


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class Host:
    def __init__(self) -> None:
        self.key: str | None = None
        self.llm: Any = None
        self.saved_env: dict[str, str | None] = {}
        self.affinity = os.sched_getaffinity(0)

    def close(self) -> None:
        if self.llm is not None:
            from splitllama.vllm import shutdown

            llm, self.llm, self.key = self.llm, None, None
            shutdown(llm)
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_env = {}
        # An in-process CPU engine pins this process to its cores; give the next engine all of them.
        os.sched_setaffinity(0, self.affinity)

    def engine(self, request: dict[str, Any], plain: bool) -> Any:
        key = json.dumps([plain, request["model"], request.get("engine", {}), request.get("env", {})], sort_keys=True)
        if key == self.key:
            return self.llm
        self.close()
        for name, value in request.get("env", {}).items():
            self.saved_env[name] = os.environ.get(name)
            os.environ[name] = str(value)
        if plain:
            from vllm import LLM

            self.llm = LLM(model=request["model"], **request.get("engine", {}))
        else:
            from splitllama.vllm import load_llm

            self.llm = load_llm(request["model"], **request.get("engine", {}))
        self.key = key
        return self.llm

    def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        kwargs = request.get("kwargs", {})
        if op == "llm_generate":
            from vllm import SamplingParams

            llm = self.engine(request, plain=True)
            prompts = [{"prompt_token_ids": ids} for ids in kwargs["prompts"]]
            params = SamplingParams(max_tokens=kwargs["max_new_tokens"], temperature=0.0, ignore_eos=True)
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        if op in ("generate", "score", "token_logprobs"):
            import splitllama.vllm

            llm = self.engine(request, plain=False)
            return _jsonable(getattr(splitllama.vllm, op)(llm, **kwargs))
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    responses = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    host = Host()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        start = time.perf_counter()
        try:
            response = {"ok": True, "result": host.handle(request)}
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
            try:
                host.close()
            except BaseException:  # noqa: BLE001
                pass
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        response["seconds"] = round(time.perf_counter() - start, 2)
        responses.write(json.dumps(response) + "\n")
    host.close()


if __name__ == "__main__":
    main()
