"""Broken inputs a researcher meets for real, built here from the random donors of conftest.py.

Each case must fail with an error that names the file or field and says what is allowed, before
any weights are used: truncated and missing shards, a missing tensor, a wrong shape or dtype, an
untied donor without its head, a config or a checkpoint that is not LLaMA, a saved split model
without its weights, a truncated training checkpoint, a malformed data file. None may load as
something else (a random adapter, an embedding used as the head, a silently cast tensor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from splitllama import build_split_model
from splitllama.checkpoint import CheckpointError
from splitllama.configuration_split_llama import SplitConfigError

from tests.conftest import RunPy, compose_run_config


# ------------------------------------------------------------------ building broken donors
def copy_donor(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shards(donor: Path) -> list[Path]:
    return sorted(donor.glob("model-*.safetensors"))


def rewrite_donor(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """``src``'s tensors, changed by ``edit``, saved as one ``model.safetensors`` with ``src``'s config."""
    dst.mkdir(parents=True)
    state: dict[str, torch.Tensor] = {}
    for shard in shards(src) or [src / "model.safetensors"]:
        state.update(load_file(shard))
    edit(state)
    save_file(state, dst / "model.safetensors")
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def build(small: Path, large: Path) -> None:
    build_split_model(small, large, 2, 3)


# ------------------------------------------------------------------ donor checkpoints
def test_truncated_shard_names_the_file(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    large = copy_donor(large_donor, tmp_path / "large")
    shard = shards(large)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))}: truncated: tensors need \d+ bytes of data but the file holds \d+"):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_missing_shard_names_the_file_and_the_index(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    large = copy_donor(large_donor, tmp_path / "large")
    shard = shards(large)[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"path70b: shard {re.escape(str(shard))} listed in model.safetensors.index.json is missing"):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_missing_tensor_is_listed(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    large = rewrite_donor(large_donor, tmp_path / "large", lambda s: s.pop("model.layers.6.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=rf"missing tensor 'model.layers.6.mlp.up_proj.weight' in path70b \({re.escape(str(large))}\)"):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_wrong_shape_names_tensor_and_expected_shape(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    def widen(state: dict[str, torch.Tensor]) -> None:
        state["model.norm.weight"] = torch.ones(130)

    large = rewrite_donor(large_donor, tmp_path / "large", widen)
    with pytest.raises(CheckpointError, match=re.escape("path70b: tensor 'model.norm.weight' has shape [130], but model.norm.weight needs [128]")):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_integer_tensor_is_not_cast_silently(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    def quantise(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.5.input_layernorm.weight"] = state["model.layers.5.input_layernorm.weight"].to(torch.int8)

    large = rewrite_donor(large_donor, tmp_path / "large", quantise)
    with pytest.raises(CheckpointError, match=re.escape(
            f"path70b: tensor 'model.layers.5.input_layernorm.weight' in {large / 'model.safetensors'} is int8; "
            "donor weights must be floating point (float32, bfloat16, float16, float64)")):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_untied_donor_without_lm_head_is_refused(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    """Its config says the head is its own tensor: the embedding must not stand in for it."""
    large = rewrite_donor(large_donor, tmp_path / "large", lambda s: s.pop("lm_head.weight"))
    assert json.loads((large / "config.json").read_text())["tie_word_embeddings"] is False
    with pytest.raises(CheckpointError, match=re.escape(
            f"missing tensor 'lm_head.weight' in path70b ({large}) (its config.json has tie_word_embeddings=false, "
            "so embed_tokens is not its head)")):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


def test_tied_donor_uses_its_embedding_as_the_head(small_donor: Path, tied_large_donor: Path, tensor_reads: list[str]) -> None:
    """The contrast to the case above: a donor whose config ties the head has no lm_head.weight."""
    from safetensors import safe_open

    model = build_split_model(small_donor, tied_large_donor, 2, 3)
    # the contrast for the read counts above: a build that succeeds reads one tensor per donor parameter (the
    # adapter is initialised); embed_tokens twice: the small donor's embedding and the large donor's tied head
    donor_params = [n for n in model.state_dict() if not n.startswith("model.adapter.")]
    assert len(tensor_reads) == len(donor_params) and tensor_reads.count("model.embed_tokens.weight") == 2
    with safe_open(str(tied_large_donor / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert torch.equal(model.lm_head.weight, f.get_tensor("model.embed_tokens.weight"))


def test_config_with_another_model_type_is_not_a_llama(tmp_path: Path, small_donor: Path, large_donor: Path, tensor_reads: list[str]) -> None:
    large = copy_donor(large_donor, tmp_path / "large")
    config = json.loads((large / "config.json").read_text())
    (large / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(SplitConfigError, match=re.escape(
            f"SplitLlamaConfig.path70b: {large / 'config.json'} declares model_type 'gpt2': not a LLaMA checkpoint")):
        build(small_donor, large)
    assert tensor_reads == []  # the error came before any tensor was read


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GPT-2 checkpoint (transformers' own classes, random weights, tiny)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)).save_pretrained(path)
    return path


def test_real_gpt2_checkpoint_is_not_a_llama(small_donor: Path, gpt2_checkpoint: Path) -> None:
    with pytest.raises(SplitConfigError, match=re.escape(f"{gpt2_checkpoint / 'config.json'} declares model_type 'gpt2': not a LLaMA checkpoint")):
        build(small_donor, gpt2_checkpoint)


def test_gpt2_weights_under_a_llama_config_are_not_a_llama(tmp_path: Path, small_donor: Path, large_donor: Path,
                                                           gpt2_checkpoint: Path) -> None:
    """A config that lies: the tensor layout says what the checkpoint is, not a list of 60 missing names."""
    large = copy_donor(gpt2_checkpoint, tmp_path / "large")
    shutil.copy(large_donor / "config.json", large / "config.json")
    with pytest.raises(CheckpointError, match=re.escape(f"path70b: {large} is not a LLaMA checkpoint: no 'model.embed_tokens.weight' or "
                                                        "'model.layers.*' tensors (it holds e.g. [")) as info:
        build(small_donor, large)
    assert "missing tensor" not in str(info.value)


def test_pickle_payload_in_an_adapter_pt_is_refused(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    """``.pt`` adapters are read with ``weights_only=True``: a pickled object is an error, never executed."""
    path = tmp_path / "adapter.pt"
    # a reference to os.system: unpickling it with full pickle would hand out a callable (what a
    # payload needs); the weights-only reader refuses the global instead
    torch.save({"adapter_linear_1.weight": torch.zeros(128, 64), "payload": os.system}, path)
    with pytest.raises(CheckpointError, match=rf"adapter_checkpoint: cannot read {re.escape(str(path))} \(safetensors or a weights-only torch file\)"):
        build_split_model(small_donor, large_donor, 2, 3, adapter_checkpoint=path)


# ------------------------------------------------------------------ saved split models
@pytest.fixture()
def saved_split_model(tmp_path: Path, small_donor: Path, large_donor: Path) -> Path:
    out = tmp_path / "hf_model"
    build_split_model(small_donor, large_donor, 2, 3).save_pretrained(out)
    return out


def test_saved_model_without_weights_fails_instead_of_assembling(saved_split_model: Path) -> None:
    """Before: loaded as donors plus a random adapter (val loss 6.73 instead of 5.81, status ok)."""
    assert json.loads((saved_split_model / "config.json").read_text())["assemble_from_donors"] is False
    (saved_split_model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{saved_split_model}: no weights file (model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
            "pytorch_model.bin.index.json); a saved split model needs its weights. To assemble it from its donors "
            f"(path8b, path70b) instead, set \"assemble_from_donors\": true in {saved_split_model / 'config.json'}")):
        AutoModelForCausalLM.from_pretrained(saved_split_model)


def test_declared_seed_style_directory_assembles_and_with_weights_is_ambiguous(saved_split_model: Path) -> None:
    config_file = saved_split_model / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "assemble_from_donors": True}))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{config_file} declares assemble_from_donors=true, but {saved_split_model} also holds model.safetensors")):
        AutoModelForCausalLM.from_pretrained(saved_split_model)
    (saved_split_model / "model.safetensors").unlink()
    assembled = AutoModelForCausalLM.from_pretrained(saved_split_model, adapter_init="identity")
    assert assembled.config.assemble_from_donors is False  # saving it writes a saved model, weights included
    assert torch.equal(assembled.model.adapter.adapter_linear_1.weight, torch.eye(128, 64))


def test_run_py_eval_of_a_model_without_weights_fails_naming_the_file(saved_split_model: Path, run_py: RunPy, tmp_path: Path) -> None:
    (saved_split_model / "model.safetensors").unlink()
    run_dir = tmp_path / "eval"
    proc = run_py("debug=quick", "task=eval", f"task.model_dir={saved_split_model}", "logger=none",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False, timeout=300)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"error: task.model_dir={saved_split_model}: {saved_split_model}: no weights file" in message, message[-3000:]
    assert "Traceback" not in message
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"]["type"] == "RunConfigError"


# ------------------------------------------------------------------ training checkpoints and data files
def test_truncated_training_checkpoint_names_the_path(tmp_path: Path) -> None:
    from splitllama.training.pipeline import resolve_ckpt_path
    from splitllama.training.schema import RunConfigError

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cfg = compose_run_config(f"ckpt_path={tmp_path}", f"paths.output_dir={tmp_path}")
    with pytest.raises(RunConfigError, match=re.escape(f"ckpt_path={tmp_path}: {ckpt} is not a readable checkpoint (truncated or corrupt: ")):
        resolve_ckpt_path(cfg)


def test_malformed_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    from splitllama.training.data import read_text_files

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=re.escape(f"data.files: {path}:2 is not valid JSON (Expecting ',' delimiter, column 15); "
                                                   "a .jsonl file holds one JSON object per line")):
        read_text_files([str(path)])
