"""Benchmark: generation throughput of split models in vLLM, against HF ``generate`` and vLLM's Llama.

Models (random weights from :func:`tests.donors.make_random_donor`, float32, cached in
``--workdir``):

- ``stitched``: a ~108M-parameter LLaMA donor (hidden 576, 9 heads of 64, 3 KV heads, FFN 1536,
  20 layers, vocab 32000) split with itself: its first 10 layers, an identity adapter, its last
  10. Same layers and weights as the donor, so vLLM's built-in ``LlamaForCausalLM`` on the donor
  is the reference it must match (target: at least 0.95x the built-in Llama's tokens/s).
- ``donor``: that donor, served by vLLM's built-in Llama (and run by HF for reference).
- ``split``: a two-donor split model: 10 layers of a hidden-384 donor, a linear adapter, the
  last 10 layers of the hidden-576 donor.

Each measurement runs in a fresh process: ``hf`` (transformers ``generate``, greedy) and ``vllm``
(``vllm.LLM`` with its defaults: the engine in its own processes, torch.compile with Inductor,
unless ``--enforce-eager``). Greedy, ``--new-tokens`` new tokens per prompt (EOS ignored) after
``--prompt-len`` random prompt tokens, batch 1 and 16; the median of ``--repeats`` timed runs after
one warm-up run. Prints a table and writes JSON to ``--out``.

    python benchmarks/inference.py                         # all models, ~15 min on 2 busy cores
    python benchmarks/inference.py --models stitched donor --backends vllm   # the 0.95x check only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT_MARK = "BENCH_RESULT "
DONOR = dict(hidden_size=576, num_hidden_layers=20, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
             intermediate_size=1536, vocab_size=32000, max_position_embeddings=1024)
SMALL_DONOR = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=3, head_dim=64,
                   intermediate_size=1024, vocab_size=32000, max_position_embeddings=1024)
MODELS = ("stitched", "donor", "split")
BACKENDS = ("hf", "vllm")


def build_models(workdir: Path) -> dict[str, Path]:
    """Create (or reuse) the donors and the split models; returns model directories by name."""
    import torch

    from splitllama import build_split_model
    from tests.donors import llama_config, make_random_donor

    paths = {"donor": workdir / "donor", "small_donor": workdir / "small_donor",
             "stitched": workdir / "stitched", "split": workdir / "split"}
    for name, shape, seed in (("donor", DONOR, 1), ("small_donor", SMALL_DONOR, 2)):
        if not (paths[name] / "config.json").is_file():
            config = llama_config(**shape)
            config.initializer_range = 0.05
            make_random_donor(paths[name], config, seed=seed, max_shard_size="200MB")
    n = DONOR["num_hidden_layers"] // 2
    if not (paths["stitched"] / "config.json").is_file():
        build_split_model(paths["donor"], paths["donor"], n, DONOR["num_hidden_layers"] - n, adapter="identity").save_pretrained(paths["stitched"])
    if not (paths["split"] / "config.json").is_file():
        model = build_split_model(paths["small_donor"], paths["donor"], 10, 10, adapter="linear", seed=0)
        model.save_pretrained(paths["split"])
    return paths


def param_count(model_dir: Path) -> int:
    from splitllama.checkpoint import LazyCheckpoint

    with LazyCheckpoint(model_dir) as ckpt:
        total = 0
        for name in ckpt.names():
            size = 1
            for d in ckpt.shape(name):
                size *= d
            total += size
    return total


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(batch * 1000 + length)
    return [[1] + [rng.randrange(4, vocab) for _ in range(length - 1)] for _ in range(batch)]


# ------------------------------------------------------------------ one measurement per process
def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import splitllama  # noqa: F401  (registers the split model)

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for batch in spec["batches"]:
        ids = torch.tensor(prompts(batch, spec["prompt_len"], DONOR["vocab_size"]))
        times = []
        for i in range(spec["repeats"] + 1):
            start = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new_tokens"],
                                     min_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0)
            if i:  # the first run warms up
                times.append(time.perf_counter() - start)
            assert gen.shape[1] == ids.shape[1] + spec["new_tokens"]
        out[f"b{batch}"] = _rates(times, batch * spec["new_tokens"])
    return out


def run_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=spec["model_dir"], dtype="float32", skip_tokenizer_init=True, max_model_len=512, seed=0,
              kv_cache_memory_bytes=spec["kv_cache_bytes"], enforce_eager=spec["enforce_eager"])
    out: dict[str, Any] = {"engine_start_s": round(time.perf_counter() - start, 1), "vllm": vllm.__version__}
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    for batch in spec["batches"]:
        inputs = [{"prompt_token_ids": p} for p in prompts(batch, spec["prompt_len"], DONOR["vocab_size"])]
        times = []
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            results = llm.generate(inputs, params, use_tqdm=False)
            if i:
                times.append(time.perf_counter() - t0)
            assert all(len(r.outputs[0].token_ids) == spec["new_tokens"] for r in results)
        out[f"b{batch}"] = _rates(times, batch * spec["new_tokens"])
        out[f"b{batch}_first_tokens"] = list(results[0].outputs[0].token_ids[:8])
    return out


def _rates(times: list[float], tokens: int) -> dict[str, float]:
    median = statistics.median(times)
    return {"tokens_per_s": round(tokens / median, 1), "median_s": round(median, 3), "runs_s": [round(t, 3) for t in times]}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (backend, model) measurement in a fresh process; returns its JSON."""
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--_run", json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    raise RuntimeError(f"measurement {spec['backend']}/{spec['model']} failed (exit {proc.returncode}):\n{tail}")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/splitllama_bench_inference"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "inference.json")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        spec = json.loads(args._run)
        result = (run_hf if spec["backend"] == "hf" else run_vllm)(spec)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    paths = build_models(args.workdir)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    conditions = {"started": started, "cpus": os.cpu_count(), "machine": platform.machine(),
                  "python": platform.python_version(), "loadavg_start": loadavg(), "dtype": "float32",
                  "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
                  "vllm_compile": "none (enforce_eager)" if args.enforce_eager else "vLLM CPU default (Dynamo + Inductor)"}
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for backend in args.backends:
            spec = {"backend": backend, "model": model, "model_dir": str(paths[model]), "batches": args.batches,
                    "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
                    "enforce_eager": args.enforce_eager, "kv_cache_bytes": args.kv_cache_bytes}
            print(f"measuring {backend} / {model} ...", flush=True)
            result = measure(spec)
            rows.append({"model": model, "backend": backend, "params_M": round(param_count(paths[model]) / 1e6, 1),
                         "loadavg": loadavg(), **result})
    conditions["loadavg_end"] = loadavg()

    def rate(model: str, backend: str, batch: int) -> float | None:
        for r in rows:
            if r["model"] == model and r["backend"] == backend and f"b{batch}" in r:
                return r[f"b{batch}"]["tokens_per_s"]
        return None

    ratios: dict[str, Any] = {}
    for batch in args.batches:
        for model in args.models:
            v, h = rate(model, "vllm", batch), rate(model, "hf", batch)
            if v and h:
                ratios[f"{model} vllm/hf b{batch}"] = round(v / h, 2)
        s, d = rate("stitched", "vllm", batch), rate("donor", "vllm", batch)
        if s and d:
            ratios[f"stitched/builtin-llama vllm b{batch}"] = round(s / d, 3)

    header = f"{'model':10} {'backend':8} {'params':>8} " + " ".join(f"{'b' + str(b) + ' tok/s':>11}" for b in args.batches)
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[f'b{b}']['tokens_per_s']:>11.1f}" for b in args.batches)
        print(f"{r['model']:10} {r['backend']:8} {r['params_M']:>7.1f}M {cells}")
    print()
    for key, value in ratios.items():
        print(f"{key:40} {value}")
    print(f"\nconditions: {json.dumps(conditions)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"conditions": conditions, "rows": rows, "ratios": ratios,
                                    "target": "stitched/builtin-llama vllm >= 0.95"}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
