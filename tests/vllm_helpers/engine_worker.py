"""A vLLM engine host for the tests: one process that runs engines one after another.

Why a separate process: a vLLM CPU engine run in-process binds the process's OpenMP threads to
cores and replaces ``torch.set_num_threads``; pytest's process must not inherit that. Why one
process for many engines: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs in this
process and starts in about 5 s, against about 35 s for vLLM's default three processes (front end,
engine core, worker: each imports vLLM), so the tests can afford one engine per model.

Protocol: one JSON request per line on stdin, one JSON response per line on the file descriptor
given as ``argv[1]`` (stdout and stderr carry vLLM's logs). The first response comes unasked: the
host is a fresh interpreter, so before anything else it imports splitllama's vLLM backend as a
user does and reports which vLLM modules that import brought (:func:`backend_import_report`; the
test that the backend imports vLLM lazily reads it, instead of paying another interpreter start).
Then each request names an ``op``:

- ``generate`` / ``score`` / ``token_logprobs``: the :mod:`splitllama.vllm` function of that name
  on an engine made by ``splitllama.vllm.load_llm(model, **engine)`` (kept while the next
  request names the same model and engine arguments),
- ``llm_generate``: plain ``vllm.LLM(model=..., **engine)`` and ``LLM.generate`` on token ids,
  bypassing splitllama's helpers (what a user who relies on the plugin alone does),
- ``sync_weights``: a trainer's weight sync into the engine (see :func:`sync_weights`),

with optional ``env`` (environment variables set while the engine runs). Response:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "traceback": "..."}``.
A failed request stops its engine, except a weight sync refused by the model's completeness check
(:class:`splitllama.CheckpointError`): that engine keeps serving, as a trainer's rollout engine
would, and the next sync or generation on it shows what the refusal left.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any


def verl_buckets(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Group tensors into buckets as veRL 0.9.1's ``BucketedWeightSender.async_send_weights`` packs
    its buffer (``verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py``): each tensor at
    an offset aligned to its element size; a bucket is sent when the next tensor would overflow
    it; a tensor larger than a bucket goes alone. (Written out here: ``import verl`` needs ray and
    tensordict, which the vLLM environment does not hold.)"""
    bucket: list[tuple[str, Any]] = []
    offset = 0
    for name, tensor in named_tensors:
        alignment = tensor.element_size()
        offset = (offset + alignment - 1) // alignment * alignment
        if offset + tensor.nbytes > bucket_bytes and bucket:
            yield bucket
            bucket, offset = [], 0
        if tensor.nbytes > bucket_bytes:
            yield [(name, tensor)]
            continue
        bucket.append((name, tensor))
        offset += tensor.nbytes
    yield bucket  # veRL sends the last bucket (is_last) even when it is empty


def sync_weights(llm: Any, source: str, bucket_bytes: int, reverse: bool = False, drop: str | None = None,
                 check: bool = False) -> list[int]:
    """Sync an actor's weights into a running engine, one ``load_weights`` call per bucket.

    The actor is the HF model saved in ``source``; its ``state_dict()`` (HF names), optionally in
    reverse order and without tensor ``drop``, goes through :func:`verl_buckets`. The calls run
    inside vLLM's layerwise reload (``initialize_layerwise_reload`` ... ``finalize_layerwise_reload``,
    what vLLM's own weight-transfer engines do around their ``load_weights`` calls): on the CPU,
    vLLM repacks each linear layer's weight after loading and drops the original parameter, so
    a bare ``load_weights`` into a running CPU engine fails for any model. (veRL 0.9.1 calls
    ``load_weights`` per bucket, then ``process_weights_after_loading``: on CUDA, where that
    repacking does not happen.) Then ``check_weights_loaded()`` if ``check``; the prefix cache is
    reset, as trainers do after a sync. Returns the number of tensors in each bucket.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    actor = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    named = [(n, t) for n, t in actor.state_dict().items() if n != drop]
    buckets = list(verl_buckets(reversed(named) if reverse else named, bucket_bytes))
    model_config = llm.llm_engine.model_config

    def receive(model: Any) -> None:
        initialize_layerwise_reload(model)
        for bucket in buckets:
            model.load_weights(bucket)
        finalize_layerwise_reload(model, model_config)
        if check:
            model.check_weights_loaded()

    llm.apply_model(receive)
    llm.reset_prefix_cache()
    return [len(b) for b in buckets]


def backend_import_report() -> dict[str, list[str]]:
    """Import ``splitllama.vllm`` and ``splitllama.vllm.loading``; the vLLM modules now loaded.

    Called first thing in this process, so every module it lists came with that import.
    """
    import splitllama.vllm
    import splitllama.vllm.loading  # noqa: F401

    return {"vllm_modules": sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))}


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
        start = time.perf_counter()
        self.close()
        print(f"[engine host] previous engine closed in {time.perf_counter() - start:.2f} s", flush=True)
        start = time.perf_counter()
        # vLLM's start-up calls gc.collect() several times before it freezes its heap (gc.freeze): each
        # walks this process's whole heap (vLLM, torch, Dynamo: about 0.4 s here). Frozen beforehand, they
        # walk only what the new engine allocates. The last shutdown collected the heap (its gc.unfreeze
        # and gc.collect), and the next one unfreezes it again: nothing stays frozen past an engine.
        gc.freeze()
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
        print(f"[engine host] engine started in {time.perf_counter() - start:.2f} s", flush=True)
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
        if op == "sync_weights":
            return sync_weights(self.engine(request, plain=False), **kwargs)
        raise ValueError(f"unknown op {op!r}")


def _engine_survives(op: str, exc: BaseException) -> bool:
    """Whether the engine stays after ``op`` failed with ``exc``: only a sync the model refused."""
    from splitllama import CheckpointError

    return op == "sync_weights" and isinstance(exc, CheckpointError)


def main() -> None:
    responses = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    try:
        started = {"ok": True, "result": backend_import_report()}
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
        started = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    responses.write(json.dumps(started) + "\n")
    host = Host()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        start = time.perf_counter()
        try:
            response = {"ok": True, "result": host.handle(request)}
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
            if not _engine_survives(request.get("op", ""), exc):
                try:
                    host.close()
                except BaseException:  # noqa: BLE001
                    pass
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        response["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[engine host] {request.get('op')} on {request.get('model')}: {response['seconds']} s, ok={response['ok']}", flush=True)
        responses.write(json.dumps(response) + "\n")
    start = time.perf_counter()
    host.close()
    print(f"[engine host] closed in {time.perf_counter() - start:.2f} s", flush=True)
    # The engine is shut down (its workers too): skip the interpreter's teardown of vLLM, torch and
    # Dynamo (seconds, which the test session's teardown waited for). Nothing is left to flush but these.
    responses.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
