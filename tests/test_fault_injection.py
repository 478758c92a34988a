"""Broken inputs a researcher meets for real, built here from the random donors of conftest.py.

Each case must fail with an error that names the file or field and says what is allowed, before
any weights are used: truncated and missing shards, a missing tensor, a wrong shape or dtype, an
untied donor without its head, a config or a checkpoint that is not LLaMA, a saved split model
without its weights, a truncated training checkpoint, a malformed data file. None may load as
something else (a random adapter, an embedding used as the head, a silently cast tensor).

And what goes wrong in a run itself: a loss that becomes non-finite (status diverged, exit 3, nothing
exported, a sweep's worst trial), two writers in one run directory or one run's output over another's,
a checkpoint whose bytes changed, and a record that says other than what ran.
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


def test_run_py_eval_of_a_model_without_weights_fails_naming_the_file(saved_split_model: Path, run_py: RunPy, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """In this process: run.py ends with the one-line error (no exception escapes it, nothing it logs is a traceback);
    test_run.py checks in subprocesses that such an ending is the process's exit status and its only message."""
    (saved_split_model / "model.safetensors").unlink()
    run_dir = tmp_path / "eval"
    ended = run_py.inline("debug=quick", "task=eval", f"task.model_dir={saved_split_model}", "logger=none",
                          f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    out, err = capfd.readouterr()
    assert ended.returncode != 0
    assert ended.message.startswith(f"error: task.model_dir={saved_split_model}: {saved_split_model}: no weights file"), ended.message
    assert "Traceback" not in out + err, (out + err)[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"]["type"] == "RunConfigError"


# ------------------------------------------------------------------ training checkpoints and data files
def test_truncated_training_checkpoint_names_the_path(tmp_path: Path) -> None:
    from splitllama.run.resume import resolve_ckpt_path
    from splitllama.errors import RunConfigError

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cfg = compose_run_config(f"ckpt_path={tmp_path}", f"paths.output_dir={tmp_path}")
    with pytest.raises(RunConfigError, match=re.escape(f"ckpt_path={tmp_path}: {ckpt} is not a readable checkpoint (truncated or corrupt: ")):
        resolve_ckpt_path(cfg)


def test_malformed_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    from splitllama.data import read_text_files

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=re.escape(f"data.files: {path}:2 is not valid JSON (Expecting ',' delimiter, column 15); "
                                                   "a .jsonl file holds one JSON object per line")):
        read_text_files([str(path)])


# ------------------------------------------------------------------ a used run directory belongs to its run
def run_main(*overrides: str) -> int | str:
    """``python run.py <overrides>`` in this process (Hydra, the run-dir guard, ``main``; conftest's
    :func:`~tests.conftest.run_in_process`): the message it exits with, else its exit code."""
    from tests.conftest import run_in_process

    ended = run_in_process(*overrides, ok=False)
    return ended.message or ended.returncode


def finished_training_run(run_dir: Path) -> dict[str, bytes]:
    """A run directory as a finished ``task=train`` run leaves it (results.json, .hydra/, hf_model/, last.ckpt);
    returns every file's bytes."""
    from splitllama.results import RunRecord

    record = RunRecord(run_dir, task="train", config={"optim": {"lr": 0.001}})
    record.claim(resume=False)
    record.update("metrics", {"val_loss": 5.0, "steps": 8})
    record.write("ok")
    record.release()  # the run has ended: its process no longer holds the directory
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.001\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- debug=quick\n")
    (run_dir / "hf_model").mkdir()
    (run_dir / "hf_model" / "model.safetensors").write_bytes(b"trained weights")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    return tree_bytes(run_dir)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", ["assemble", "eval"])
def test_another_task_may_not_resume_a_training_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """Before: ``task=assemble ckpt_path=last`` into a finished training run exited 0, its trained hf_model/ overwritten
    by an untrained assembly and results.json's top record the assemble. Refused now, before anything is written."""
    run_dir = tmp_path / "run"
    before = finished_training_run(run_dir)
    code = run_main("debug=quick", f"task={task}", "ckpt_path=last", "logger=none", f"hydra.run.dir={run_dir}",
                    f"paths.cache_dir={tmp_path / 'cache'}")
    assert isinstance(code, str) and code.startswith(f"error: run directory {run_dir} belongs to a task=train run with status 'ok' "), code
    assert f"task={task} may not resume it (only task=train may, with ckpt_path=last)" in code
    assert tree_bytes(run_dir) == before
    assert not (tmp_path / "cache").exists()  # nothing heavy started


def test_every_attempt_keeps_its_composed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a resume replaced .hydra/config.yaml and overrides.yaml, so the ok run showed the failed attempt's optim.lr=-1."""
    from splitllama.results import read_results

    run_dir = tmp_path / "run"
    before = finished_training_run(run_dir)
    for attempt in (2, 3):
        code = run_main("debug=quick", "ckpt_path=last", f"optim.lr=-{attempt}", "logger=none", f"hydra.run.dir={run_dir}")
        assert code == f"error: optim.lr=-{attempt}.0: must be > 0"
        overrides = (run_dir / ".hydra" / f"attempt-{attempt}" / "overrides.yaml").read_text()
        assert f"optim.lr=-{attempt}" in overrides and "ckpt_path=last" in overrides
        assert (run_dir / ".hydra" / f"attempt-{attempt}" / "config.yaml").is_file()
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).read_bytes() == before[name]
    kept = read_results(run_dir)
    assert kept["status"] == "ok" and [a["status"] for a in kept["attempts"]] == ["failed", "failed"]
    assert [read_results(run_dir / a["record"])["paths"]["hydra_config"] for a in kept["attempts"]] == [
        str(run_dir / ".hydra" / "attempt-2"), str(run_dir / ".hydra" / "attempt-3")]


# ------------------------------------------------------------------ a resume continues the same run
def test_a_resume_continues_the_same_run(embedded_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: resuming with layers.n70=2 trained layers [6, 7] from a checkpoint of [4, 5, 6, 7], and a resume with
    another trainer.max_steps silently ran another schedule. Each change is refused, naming it old -> new; extending
    is asked for (task.extend=true), and results.json records it with what the schedule does."""
    from splitllama.results import read_results

    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    common = ("debug=quick", "logger=none", "eval.references=false", f"paths.cache_dir={embedded_cache}", f"hydra.run.dir={run_dir}")
    assert run_main(*common, "task.stop_after_steps=2") == 0
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["splitllama_trained_result"]
    assert saved["layers.list70"] == [4, 5, 6, 7] and saved["trainer.max_steps"] == 8 and len(saved["donors.large"]) == 16

    refused = f"error: ckpt_path=last: the checkpoint {ckpt} (step 2) was trained with other settings, and a resume continues the same run: "
    code = run_main(*common, "ckpt_path=last", "layers.n70=2", "optim.lr=0.002")
    assert code == refused + ("optim.lr: 0.001 -> 0.002; layers.list70: [4, 5, 6, 7] -> [6, 7]. Start a new run for new settings "
                              "(no ckpt_path, a new run directory)")
    code = run_main(*common, "ckpt_path=last", "trainer.max_steps=12")
    assert code == refused + ("trainer.max_steps: 8 -> 12. Start a new run for new settings (no ckpt_path, a new run directory); "
                              "to train past trainer.max_steps=8, resume with task.extend=true (nothing else changed)")
    code = run_main(*common, "ckpt_path=last", "trainer.max_steps=4", "task.extend=true")
    assert code == refused + ("trainer.max_steps: 8 -> 4. Start a new run for new settings (no ckpt_path, a new run directory); "
                              "a run is not shortened on resume (trainer.max_steps=8: task.extend only lengthens it)")

    assert run_main(*common, "ckpt_path=last", "trainer.max_steps=12", "task.extend=true") == 0
    results = read_results(run_dir)
    assert results["status"] == "ok" and results["metrics"]["steps"] == 12
    assert [a["status"] for a in results["attempts"]] == ["interrupted", "failed", "failed", "failed"]
    resume = results["resume"]
    assert resume["from_step"] == 2 and resume["checked"] and resume["extended"] == {"trainer.max_steps": [8, 12]}
    assert resume["schedule"].startswith("warmup then cosine recomputed over the new 12 steps: at step 2 the learning rate is ")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["splitllama_trained_result"]["trainer.max_steps"] == 12


def test_the_donor_fingerprint_follows_the_weights_not_the_files(tmp_path: Path, large_donor: Path) -> None:
    """A resume compares the donors by content: a copy is the same donor, a changed tensor another."""
    from splitllama.checkpoint import weights_fingerprint

    copy = copy_donor(large_donor, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(large_donor)

    def nudge(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.7.mlp.down_proj.weight"][0, 0] += 1e-3

    changed = rewrite_donor(large_donor, tmp_path / "changed", nudge)
    same = rewrite_donor(large_donor, tmp_path / "same", lambda state: None)
    assert weights_fingerprint(changed) != weights_fingerprint(same)


# ------------------------------------------------------------------ every override is checked
@pytest.mark.parametrize(("overrides", "message"), [
    (["+layers.n_70=1"], "+layers.n_70=1: layers has no key 'n_70'; did you mean layers.n70? its keys: n8, n70, list8, list70"),
    (["+donors.embedded.small.hiden_size=64"], "+donors.embedded.small.hiden_size=64: donors.embedded.small has no key 'hiden_size'; "
                                               "did you mean donors.embedded.small.hidden_size?"),
    (["+seeds=3"], "+seeds=3: the config has no key 'seeds'; did you mean seed?"),
    (["data.seq_len=4096"], "data.seq_len=4096: above the donors' max_position_embeddings (small 2048, large 2048); must be <= 2048"),
    (["data.val_batch_size=0"], "data.val_batch_size=0: must be >= 1, or null for the default"),
    (["data.max_val_blocks=0"], "data.max_val_blocks=0: must be >= 1, or null for the default"),
    (["backend.micro_batch_size=0"], "backend.micro_batch_size=0: must be >= 1, or null for the default"),
], ids=["misspelt + key", "misspelt nested + key", "misspelt top-level + key", "seq_len past the positions", "val batch 0",
        "val blocks 0", "micro batch 0"])
def test_overrides_outside_what_the_run_reads_are_refused(overrides: list[str], message: str) -> None:
    """Before: each ran with exit 0, the key ignored (the model had 4 large layers, not 1) or the value replaced
    (validation at batch 4 while results.json recorded 0), or trained at positions the donors never saw."""
    from splitllama.run.checks import validate
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError, match="^" + re.escape(message)):
        validate(compose_run_config("debug=quick", *overrides))


def test_free_form_nodes_take_new_keys() -> None:
    from splitllama.run.checks import validate

    validate(compose_run_config("debug=quick", "+backend.options.use_cache=false",
                                "+callbacks.extra.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor"))


# ------------------------------------------------------------------ data files: every error names the file
@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "one"}\n{"text": null}\n', ":2: its 'text' is null, not text; each row's data.text_field must be a JSON string"),
    (b'{"text": "one"}\n\n{"text": 12345}\n', ":3: its 'text' is 12345, not text; each row's data.text_field must be a JSON string"),
    (b'{"text": "caf\xc3\xa9"}\n{"text": "caf\xe9"}\n', ":2 is not UTF-8 text (byte 0xe9 at offset 31); convert the file to UTF-8"),
    (b"", " holds no documents (an empty file)"),
    (b"\n \n", " holds no documents (only whitespace)"),
], ids=["null text", "number text", "not UTF-8", "empty", "blank"])
def test_bad_data_files_name_the_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    """Before: null and 12345 were trained on as the documents "None" and "12345"; a non-UTF-8 or empty file
    failed with an error that named no file."""
    from splitllama.data import read_text_files
    from splitllama.errors import RunConfigError

    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {path}{message}")):
        read_text_files([str(tmp_path / "docs.jsonl")])


def test_a_directory_is_not_a_data_file(tmp_path: Path) -> None:
    from splitllama.data import read_text_files
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {tmp_path} is a directory; list the .txt or .jsonl files in it")):
        read_text_files([str(tmp_path)])


def test_too_small_a_corpus_names_its_files(embedded_cache: Path, tmp_path: Path) -> None:
    from splitllama.results import RunRecord
    from splitllama.run.setup import check, load
    from splitllama.errors import RunConfigError

    path = tmp_path / "docs.txt"
    path.write_text("one short document")
    cfg = compose_run_config("debug=quick", "data=files", f"data.files=[{path}]", f"paths.cache_dir={embedded_cache}",
                             f"paths.output_dir={tmp_path}")
    record = RunRecord(tmp_path, task="train", config={})
    with pytest.raises(RunConfigError, match=re.escape(f"(data.files=['{path}'])")):
        load(cfg, record, check(cfg, record), stage="fit", references=False)


def test_a_run_directory_as_model_dir_points_at_its_model(tmp_path: Path) -> None:
    """Before: an error about a config.json that does not exist in the run directory."""
    from splitllama.run.checks import validate
    from splitllama.errors import RunConfigError

    run_dir = tmp_path / "run"
    finished_training_run(run_dir)
    cfg = compose_run_config("debug=quick", "task=eval", f"task.model_dir={run_dir}")
    with pytest.raises(RunConfigError, match="^" + re.escape(
            f"task.model_dir={run_dir}: {run_dir} is a run directory, not a saved split model; its task saved no model (paths.export_dir)")):
        validate(cfg)
    from splitllama.results import RunRecord, read_results

    record = RunRecord(run_dir, task="train", config={})
    record.previous = read_results(run_dir)
    record.update("paths", {"export_dir": str(run_dir / "hf_model")})
    record.write("ok")
    with pytest.raises(RunConfigError, match=re.escape(f"its saved model is task.model_dir={run_dir / 'hf_model'}")):
        validate(cfg)
    with pytest.raises(RunConfigError, match=re.escape(f"task.model_dir={tmp_path}: {tmp_path} has no config.json: not a saved split model")):
        validate(compose_run_config("debug=quick", "task=eval", f"task.model_dir={tmp_path}"))


# ------------------------------------------------------------------ two donors share one tokenizer
def test_donors_with_permuted_tokenizers_are_refused(embedded_cache: Path, tmp_path: Path) -> None:
    """Before: a large donor whose tokenizer.json gives two tokens each other's ids (same vocabulary size) trained
    without a word. Refused now, naming what differs; allowed only when asked for, and recorded."""
    from splitllama.results import RunRecord
    from splitllama.run.donors import resolve_donors
    from splitllama.run.setup import check, load
    from splitllama.errors import RunConfigError

    built = resolve_donors(compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}"))
    small, large = copy_donor(Path(built.path8b), tmp_path / "small"), copy_donor(Path(built.path70b), tmp_path / "large")
    tokenizer = json.loads((large / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (large / "tokenizer.json").write_text(json.dumps(tokenizer))

    def load_run(*overrides: str) -> RunRecord:
        cfg = compose_run_config("debug=quick", f"donors.path8b={small}", f"donors.path70b={large}", f"paths.cache_dir={embedded_cache}",
                                 f"paths.output_dir={tmp_path}", *overrides)
        record = RunRecord(tmp_path, task="train", config={})
        load(cfg, record, check(cfg, record, harness=False), stage=None, references=False)
        return record

    with pytest.raises(RunConfigError, match="^" + re.escape(
            f"donors: the large donor's tokenizer ({large}) differs from the small donor's ({small}), which the split model reads "
            "with, in: vocabulary (2 of 2048 tokens have another id or none); a token id would mean one thing")):
        load_run()
    assert load_run("donors.allow_tokenizer_mismatch=true").data["donors"]["tokenizers"]["mismatch_allowed"] == ["vocabulary"]
    shutil.copy(small / "tokenizer.json", large / "tokenizer.json")
    assert load_run().data["donors"]["tokenizers"] == "same"


# ------------------------------------------------------------------ disk full
class FillDisk:
    """A training callback that fills the file system of ``path`` up to ``free`` bytes, after ``step`` steps or
    at the end of training (``step=null``): the next large write (a checkpoint, the export) hits a real ENOSPC."""

    def __new__(cls, path: str, step: int | None = None, free: int = 64 << 10):  # noqa: ANN204
        import lightning.pytorch as pl

        def fill(trainer) -> None:  # noqa: ANN001
            stat = os.statvfs(path)
            with open(Path(path) / "filler", "ab") as f:
                f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))

        class _Fill(pl.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001
                if step is not None and trainer.global_step == step:
                    fill(trainer)

            def on_train_end(self, trainer, *args) -> None:  # noqa: ANN001
                if step is None:
                    fill(trainer)

        return _Fill()


@pytest.fixture()
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 64 MiB tmpfs of its own (needs root, as the test machines run)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize(("fill", "where", "last_step"), [("step=6", "the step-8 checkpoint", 4), ("step=null", "the export", 8)],
                         ids=["checkpoint", "export"])
def test_a_full_disk_is_recorded_and_leaves_nothing_partial(embedded_cache: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                                            fill: str, where: str, last_step: int) -> None:
    """Before: a full disk while writing a checkpoint left half of it under its real name (and Lightning's staged copy),
    which kept the space, so no results.json was written at all. Now the partial file or export is removed and
    results.json records the failure; last.ckpt is the last complete checkpoint."""
    from splitllama.results import read_results

    run_dir = small_disk / "run"
    # finetune=adapter: checkpoints of a few MB, so they fit the 64 MiB disk before it is filled on purpose
    code = run_main("debug=quick", "finetune=adapter", "logger=none", "eval.references=false", f"paths.cache_dir={embedded_cache}",
                    f"hydra.run.dir={run_dir}", "+callbacks.extra.fill._target_=tests.test_fault_injection.FillDisk",
                    f"+callbacks.extra.fill.path={small_disk}", f"+callbacks.extra.fill.{fill}")
    assert code not in (0, None), where
    results = read_results(run_dir)
    # the writer's own error: OSError (a checkpoint), SafetensorError (the export's weights)
    assert results["status"] == "failed" and "No space left on device" in results["error"]["message"], results.get("error")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".hydra", ".run_claim"]
    assert not (run_dir / "hf_model").exists()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"]  # no partial file beside it (the default keeps last.ckpt alone: save_top_k=0)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == last_step


def test_results_json_on_a_full_disk_leaves_no_temporary_file(small_disk: Path) -> None:
    from splitllama.results import RunRecord

    record = RunRecord(small_disk / "run", task="train", config={"big": "x" * (1 << 20)})
    record.claim(resume=False)
    FillDisk(str(small_disk), step=None, free=0).on_train_end(None)
    with pytest.raises(OSError, match="No space left on device"):
        record.write("failed")
    record.release()
    assert sorted(p.name for p in (small_disk / "run").iterdir()) == [".run_claim"]


# ------------------------------------------------------------------ a checkpoint's metadata agrees with its tensors
def raw_safetensors(path: Path, header: object, data: bytes, *, header_bytes: bytes | None = None) -> Path:
    """A safetensors file written byte by byte (so it can break the format in one chosen way)."""
    import struct

    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(shape: list[int], start: int) -> dict:
    import math

    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + 4 * math.prod(shape)]}


#: each way a safetensors file can disagree with the format, as (file builder, our message after "<file>: ")
SAFETENSORS_CLASSES = {
    "shorter than its length field": (lambda p: p.write_bytes(b"\x08\0\0") and p, "not a safetensors file (only 3 bytes)"),
    "header past the end": (lambda p: raw_safetensors(p, {"a": f32([2], 0)}, b"")
                            .write_bytes(p.read_bytes()[:20]) and p, "truncated or corrupt (header of "),
    "header not JSON": (lambda p: raw_safetensors(p, None, b"", header_bytes=b"{not json"), "cannot read safetensors header: not UTF-8 JSON"),
    "header not UTF-8": (lambda p: raw_safetensors(p, None, b"", header_bytes=b'{"\xff": 1}'), "cannot read safetensors header: not UTF-8 JSON"),
    "header not an object": (lambda p: raw_safetensors(p, [1, 2], b""), "safetensors header is a JSON list, not an object of tensors"),
    "metadata not strings": (lambda p: raw_safetensors(p, {"__metadata__": {"format": 1}, "a": f32([2], 0)}, bytes(8)),
                             "safetensors __metadata__ must map strings to strings"),
    "unknown dtype": (lambda p: raw_safetensors(p, {"a": {**f32([2], 0), "dtype": "F99"}}, bytes(8)),
                      "tensor 'a' has dtype 'F99', not a safetensors dtype"),
    "negative dimension": (lambda p: raw_safetensors(p, {"a": {**f32([2], 0), "shape": [-2]}}, bytes(8)),
                           "tensor 'a' has shape [-2]: must be a list of non-negative integers"),
    "offsets reversed": (lambda p: raw_safetensors(p, {"a": {**f32([0], 0), "data_offsets": [8, 0]}}, bytes(8)),
                         "tensor 'a' has data_offsets [8, 0]: must be [start, end] with 0 <= start <= end"),
    "bytes not the shape's": (lambda p: raw_safetensors(p, {"a": {**f32([2], 0), "shape": [3]}}, bytes(8)),
                              "tensor 'a': F32 of shape [3] takes 12 bytes, but its data_offsets [0, 8] span 8"),
    "gap between tensors": (lambda p: raw_safetensors(p, {"a": f32([2], 0), "b": f32([1], 12)}, bytes(16)),
                            "tensor 'b' starts at byte 12 of the data, where the tensors before it end at 8: it leaves 4 bytes"),
    "overlapping tensors": (lambda p: raw_safetensors(p, {"a": f32([2], 0), "b": f32([1], 4)}, bytes(8)),
                            "tensor 'b' starts at byte 4 of the data, where the tensors before it end at 8: it overlaps"),
    "first tensor not at 0": (lambda p: raw_safetensors(p, {"a": f32([2], 4)}, bytes(12)),
                              "tensor 'a' starts at byte 4 of the data, where the tensors before it end at 0"),
    "data shorter (truncated)": (lambda p: raw_safetensors(p, {"a": f32([4], 0)}, bytes(8)),
                                 "truncated: tensors need 16 bytes of data but the file holds 8"),
    "data longer (trailing bytes)": (lambda p: raw_safetensors(p, {"a": f32([2], 0)}, bytes(12)),
                                     "4 bytes after the last tensor that no header entry describes"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CLASSES))
def test_a_safetensors_file_is_valid_as_the_format_defines_it(tmp_path: Path, case: str) -> None:
    """Each class the reference reader (safetensors.safe_open) refuses is refused by ours, naming the file. Before,
    a gap, an overlap, trailing bytes, a wrong byte count or an unknown dtype went through (or failed later with a KeyError)."""
    from safetensors import safe_open

    from splitllama.checkpoint import LazyCheckpoint

    build, message = SAFETENSORS_CLASSES[case]
    path = build(tmp_path / "model.safetensors")
    with pytest.raises(Exception):  # noqa: B017,PT011 - the reference's own error type
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path}: {message}")):
        LazyCheckpoint(tmp_path)


def test_a_header_above_the_formats_limit_is_refused(tmp_path: Path) -> None:
    import struct

    from splitllama.checkpoint import MAX_HEADER_BYTES, LazyCheckpoint

    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:  # sparse: nothing written past the length field
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 16)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: a header of {MAX_HEADER_BYTES + 1} bytes, above the format's limit")):
        LazyCheckpoint(tmp_path)


def test_a_shard_holding_a_tensor_its_index_does_not_list_is_refused(tmp_path: Path, large_donor: Path) -> None:
    from splitllama.checkpoint import INDEX_FILE, LazyCheckpoint

    large = copy_donor(large_donor, tmp_path / "large")
    index = json.loads((large / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    name = next(n for n, shard in weight_map.items() if list(weight_map.values()).count(shard) > 1)
    shard = weight_map.pop(name)
    (large / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"path70b: {large / shard} holds {name!r}, but {INDEX_FILE} does not list it")):
        LazyCheckpoint(large, role="path70b")
    # a whole shard the index does not list (a leftover file, or one the index lost)
    for other in [n for n, s in weight_map.items() if s == shard]:
        del weight_map[other]
    (large / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"path70b: {large} holds [{shard!r}], which {INDEX_FILE} does not list")):
        LazyCheckpoint(large, role="path70b")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update({"model.layers.8.input_layernorm.weight": torch.ones(128)}),
     "{config} has num_hidden_layers=8, but the tensors hold layers [8] too"),
    (lambda s: s.update({"model.layers.2.self_attn.q_proj.bias": torch.zeros(128)}),
     "1 tensor(s) that a LLaMA of {config} does not have: ['model.layers.2.self_attn.q_proj.bias']"),
    (lambda s: s.update({"model.embed_tokens.weight": torch.zeros(300, 128)}),
     "tensor 'model.embed_tokens.weight' has shape [300, 128], but {config} gives [256, 128]"),
], ids=["a layer past num_hidden_layers", "a tensor LLaMA has not", "a shape the config does not give"])
def test_a_donors_config_agrees_with_every_tensor_present(tmp_path: Path, small_donor: Path, large_donor: Path, edit, message: str) -> None:  # noqa: ANN001
    """Before: these built and trained without a word (the split reads neither layer 8, nor a bias, nor the large
    donor's embedding), though the checkpoint is not what its config.json says."""
    large = rewrite_donor(large_donor, tmp_path / "large", edit)
    with pytest.raises(CheckpointError, match=re.escape(f"path70b: " + message.format(config=large / "config.json"))):
        build(small_donor, large)


def test_a_saved_split_model_holding_tensors_its_config_has_no_place_for_is_refused(saved_split_model: Path) -> None:
    """Before: a layer past num_layers_70 in model.safetensors was dropped silently on loading."""
    state = load_file(saved_split_model / "model.safetensors")
    extra = {k.replace("layers_last.2.", "layers_last.3."): v.clone() for k, v in state.items() if "layers_last.2." in k}
    save_file({**state, **extra}, saved_split_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"{saved_split_model}: checkpoint holds {len(extra)} tensor(s) its config.json has no place for")):
        AutoModelForCausalLM.from_pretrained(saved_split_model)


# ------------------------------------------------------------------ a diverged run is not ok
#: a run that diverges in its first steps (lr 100 from step 0), with nothing else to pay for: no scoring before
#: training, no least-squares adapter fit, no donor references, no logger
DIVERGING = ("debug=quick", "logger=none", "eval.references=false", "task.eval_before=false", "adapter.init=random",
             "optim.lr=100", "optim.warmup_steps=0")


def test_a_diverging_run_ends_diverged_exports_nothing_and_exits_3(run_py: RunPy, tmp_path: Path) -> None:
    """Before: ``optim.lr=100`` exited 0 with ``status: ok``, ``val_loss: "nan"``, an hf_model/ of NaN weights and
    checkpoints of them (a resume trained on NaN). Now: status diverged (the step, the loss, the last finite loss),
    no export, no checkpoint of non-finite weights, exit status 3 (a process: what a shell or a scheduler sees).
    ``trainer.nonfinite_patience=3`` goes on past the first NaN loss (step 3) until the checkpoint due at step 4
    would hold NaN weights: it is not written, and the run ends there (the sweep test below stops at once, patience 0)."""
    import math

    from splitllama.results import read_results

    run_dir = tmp_path / "run"
    proc = run_py(*DIVERGING, "trainer.nonfinite_patience=3", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert proc.returncode == 3, (proc.stdout[-2000:], proc.stderr[-3000:])  # splitllama.results.DIVERGED_EXIT_STATUS
    results = read_results(run_dir)
    assert results["status"] == "diverged" and results["error"]["type"] == "RunDiverged"
    diverged = results["diverged"]
    assert diverged["where"] == "checkpoint" and diverged["step"] == 4 == results["metrics"]["steps"]
    assert diverged["step"] > diverged["last_finite_step"] + 1 and math.isfinite(diverged["last_finite_loss"])  # it went on past one
    assert "val_loss" not in results["metrics"]
    assert not (run_dir / "hf_model").exists() and not (run_dir / "checkpoints").exists()
    message = results["error"]["message"]
    assert message.startswith("training diverged at step 4: the weights hold NaN or infinite values (") and "Lower optim.lr" in message
    assert message in proc.stdout + proc.stderr


def test_a_checkpoint_with_nonfinite_tensors_is_not_saved(tmp_path: Path) -> None:
    """The writer itself refuses (checkpoints saved without the training callbacks too, e.g. by a signal).
    Before: written like any other."""
    from splitllama.training.callbacks import AtomicCheckpointIO

    weights = {"state_dict": {"layer.weight": torch.tensor([1.0, float("nan")])}, "global_step": 5}
    with pytest.raises(Exception, match=re.escape(f"the checkpoint of step 5 was not saved to {tmp_path / 'last.ckpt'}: "
                                                  "1 tensor(s) (state_dict.layer.weight) hold NaN or infinite values")) as refused:
        AtomicCheckpointIO().save_checkpoint(weights, tmp_path / "last.ckpt")
    assert type(refused.value).__name__ == "RunDiverged"  # splitllama.results: run.py records status diverged
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["bytes changed", "NaN weights"])
def test_a_checkpoint_is_checked_whole_when_a_resume_loads_it(tmp_path: Path, damage: str) -> None:
    """Before: bytes changed inside last.ckpt (a disk, a copy) resumed as other weights (torch.load checks no CRC: the
    run ended ok with val_loss nan); a checkpoint of NaN weights resumed too. The Trainer's checkpoint reader refuses
    both, naming the file and where to resume from instead."""
    from splitllama.errors import RunConfigError
    from splitllama.run.trainer import make_trainer

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(64) if damage == "bytes changed" else torch.full((64,), float("nan"))},
                "global_step": 3}, ckpt)
    if damage == "bytes changed":
        data = bytearray(ckpt.read_bytes())
        at = data.index(b"\x00\x00\x80\x3f" * 64)  # the tensor's 64 float32 ones, stored uncompressed
        data[at + 3] = 0x40  # 1.0 -> 4.0: a finite value, nothing but the CRC can tell
        ckpt.write_bytes(bytes(data))
        assert torch.load(ckpt, weights_only=True)["state_dict"]["w"][0] == 4.0  # torch reads it as other weights
        expected = f"ckpt_path: the checkpoint {ckpt} is damaged: its member last/data/0 fails its CRC-32 check"
    else:
        expected = f"ckpt_path: the checkpoint {ckpt} holds NaN or infinite values in 1 tensor(s) (state_dict.w): the run it continues had diverged"
    reader = make_trainer(compose_run_config("debug=quick", f"paths.output_dir={tmp_path}"), [], []).strategy.checkpoint_io
    with pytest.raises(RunConfigError, match="^" + re.escape(expected)) as refused:
        reader.load_checkpoint(ckpt)
    assert str(refused.value).endswith(f"resume from another .ckpt in {ckpt.parent} (ckpt_path=<that file>), or start a new run "
                                       "(no ckpt_path, a new run directory)")


def test_a_sweep_goes_on_past_a_diverged_trial_and_optuna_counts_it_worst(run_py: RunPy, tmp_path: Path) -> None:
    """Before: ``-m optim.lr=1e-3,100``: the NaN run was ok with val_loss "nan", the summary raised comparing a float
    with that string (no table, no figures), and Optuna's study aborted on the NaN value. Now the diverged trial
    is +inf to Optuna, whose study goes on and picks the finite one; the summary lists it last."""
    import yaml

    from splitllama.analysis import load_sweep
    from splitllama.results import read_results

    sweep_dir = tmp_path / "s"
    run_py.inline("-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.direction=minimize",
                  "hydra.sweeper.n_trials=2", *DIVERGING[:-2], "optim.warmup_steps=0", "optim.lr=choice(0.001,100)",
                  "trainer.max_steps=3", "trainer.val_check_interval=3", "task.export=false", "hydra.callbacks.sweep_summary.figures=false",
                  f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    report = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert report["best_params"] == {"optim.lr": 0.001} and report["best_value"] < 10
    df = load_sweep(sweep_dir).set_index("status")
    assert sorted(df.index) == ["diverged", "ok"] and df.loc["diverged", "error"].startswith("RunDiverged: training diverged at step ")
    diverged = read_results(df.loc["diverged", "run_dir"])["diverged"]
    assert diverged["where"] == "train" and diverged["step"] == diverged["last_finite_step"] + 1  # at once: patience 0
    assert sorted(line.split(",")[1] for line in (sweep_dir / "summary.csv").read_text().splitlines()[1:]) == ["diverged", "ok"]


def test_the_sweep_summary_reads_a_nonfinite_loss_written_as_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """results.json writes a non-finite number as a string ("nan": JSON has none), as the runs that diverged with
    status ok did; one such string in the loss column made the sweep's summary callback raise (its heatmap compared
    it with a float): no table, no figures. The summary now reads it as NaN and lists the runs that are not ok last."""
    from omegaconf import OmegaConf

    from splitllama.sweeps import SweepSummary

    for job, status, loss, n70 in (("0", "ok", 5.0, 2), ("1", "ok", "nan", 3), ("2", "diverged", None, 4)):
        (tmp_path / job).mkdir()
        metrics = {"val_loss": loss, "val_ppl": loss} if loss is not None else {}
        split = {"n8": 2, "n70": n70, "adapter": "linear"}
        (tmp_path / job / "results.json").write_text(json.dumps({"status": status, "metrics": metrics, "config": {}, "split": split}))
    SweepSummary(figures=True).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    table = capsys.readouterr().out.splitlines()
    assert table[1] == f"sweep {tmp_path}: 3 runs (2 ok, 1 diverged)"
    assert [line.split()[1] for line in table[5:8]] == ["ok", "ok", "diverged"]
    assert (tmp_path / "heatmap.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------ one writer per run
def test_a_second_live_process_in_a_run_directory_is_refused_naming_it(tmp_path: Path) -> None:
    """Before: two resumes of one run started 2 s apart both ran (both ok; the first one's result was in neither
    results.json nor results_history/). Now a run directory has one live process: the second is refused before it
    writes anything, naming the holder (pid, host, start, command)."""
    import socket

    from splitllama.results import RunRecord

    run_dir = tmp_path / "run"
    finished_training_run(run_dir)
    holder = RunRecord(run_dir, task="train", config={})
    holder.claim(resume=True)  # a resume of the run, still running (this process)
    before = tree_bytes(run_dir)
    code = run_main("debug=quick", "ckpt_path=last", "logger=none", f"hydra.run.dir={run_dir}")
    assert isinstance(code, str) and code.startswith(
        f"error: run directory {run_dir} is in use by a running process (pid {os.getpid()} on {socket.gethostname()}, "
        f"started {holder.data['started']}: `"), code
    assert code.endswith("); one process at a time writes a run directory. Wait for it to end (or stop it), then run again; "
                         "or give this run its own directory (leave hydra.run.dir to its default)")
    assert tree_bytes(run_dir) == before
    holder.release()
    # the lock was all that stood in the way: the resume now gets as far as the (fake) checkpoint
    assert "is not a readable checkpoint" in run_main("debug=quick", "ckpt_path=last", "logger=none", f"hydra.run.dir={run_dir}")


def test_a_fresh_run_racing_another_for_its_directory_writes_nothing(tmp_path: Path) -> None:
    """Before: two fresh runs passed the run-dir guard together (the claim came later, in the task), so the loser
    wrote its .hydra/config.yaml and run.log beside the winner's result. The guard now claims the directory."""
    from splitllama.results import RunDirGuard, RunRecord

    run_dir = tmp_path / "run"
    RunDirGuard().on_run_start(compose_run_config("debug=quick", f"hydra.run.dir={run_dir}", hydra_node=True))  # the winner
    code = run_main("debug=quick", "optim.lr=-1", "logger=none", f"hydra.run.dir={run_dir}")
    assert isinstance(code, str) and code.startswith(f"error: run directory {run_dir} is in use by a running process (pid {os.getpid()} "), code
    assert sorted(p.name for p in run_dir.iterdir()) == [".run_claim"]
    winner = RunRecord(run_dir, task="train", config={})
    winner.claim(resume=False)  # run.py's claim takes over the guard's
    winner.release()


def test_a_killed_holder_leaves_the_run_directory_free(tmp_path: Path) -> None:
    """The lock is the kernel's (flock): a process killed with SIGKILL holds nothing, so its run resumes at once."""
    import signal

    from splitllama.results import RunDirInUse, RunRecord

    run_dir = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: a run that claimed its directory and is running
        try:
            record = RunRecord(run_dir, task="train", config={})
            record.claim(resume=False)
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(1)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(RunDirInUse, match=re.escape(f"is in use by a running process (pid {pid} on ")):
            RunRecord(run_dir, task="train", config={}).claim(resume=True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    resumed = RunRecord(run_dir, task="train", config={})
    resumed.claim(resume=True)
    assert json.loads((run_dir / ".run_claim").read_text())["pid"] == os.getpid()
    resumed.release()


@pytest.mark.parametrize("case", ["export into another run", "checkpoints into another run", "export over its own run",
                                  "export over files no run wrote", "run directory inside another run"])
def test_a_run_writes_only_its_own_directory_or_places_no_run_records(embedded_cache: Path, tmp_path: Path, case: str) -> None:
    """Before: ``task=assemble paths.export_dir=<a finished run>/hf_model`` exited 0, the trained model replaced by an
    untrained assembly while the victim's results.json still said ok; an export over a folder replaced the folder
    whole (its files gone). Each is refused before any work, naming the setting, whose the place is and what to give."""
    from splitllama.results import read_results

    victim = tmp_path / "victim"
    finished_training_run(victim)
    new = tmp_path / "new"
    common = ("debug=quick", "logger=none", "adapter.init=random", "eval.references=false", f"paths.cache_dir={embedded_cache}")
    recorded = f"a task=train run with status 'ok' started {read_results(victim)['started']}"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    overrides, message = {
        "export into another run": (["task=assemble", f"paths.export_dir={victim}/hf_model"],
                                    f"paths.export_dir={victim}/hf_model: lies in the run directory {victim} of {recorded}, whose files a run "
                                    "must not replace"),
        "checkpoints into another run": (["trainer.max_steps=2", f"paths.checkpoint_dir={victim}/checkpoints"],
                                         f"paths.checkpoint_dir={victim}/checkpoints: lies in the run directory {victim} of {recorded}"),
        "export over its own run": (["task=assemble", f"paths.export_dir={tmp_path}"],
                                    f"paths.export_dir={tmp_path}: is this run's directory or holds it ({new}), which the run's output "
                                    f"would replace; leave paths.export_dir to its default (inside this run's directory {new})"),
        "export over files no run wrote": (["task=assemble", f"paths.export_dir={foreign}"],
                                           f"paths.export_dir={foreign}: holds files no run wrote (todo.txt), which the run would replace "
                                           "or mix with its own; give a new or empty directory"),
        "run directory inside another run": (["task=assemble", f"hydra.run.dir={victim}/hf_model/run"], ""),
    }[case]
    before, notes = tree_bytes(victim), tree_bytes(foreign)
    run_dir = victim / "hf_model" / "run" if case == "run directory inside another run" else new
    code = run_main(*common, *overrides, *([] if "hydra.run.dir" in overrides[-1] else [f"hydra.run.dir={new}"]))
    if case == "run directory inside another run":
        assert code == (f"error: run directory {run_dir} lies inside the run directory {victim} of {recorded}; a run's directory holds "
                        "only its own files. Give hydra.run.dir a path outside other runs' directories (or leave it to its default)")
    else:
        assert isinstance(code, str) and code.startswith(f"error: {message}"), code
        assert read_results(new)["status"] == "failed" and "timings" in read_results(new)  # recorded, before any work
        assert "donors_s" not in read_results(new)["timings"]
    assert tree_bytes(victim) == before and tree_bytes(foreign) == notes


def test_an_export_outside_the_run_directory_is_marked_and_no_later_run_replaces_it(embedded_cache: Path, tmp_path: Path) -> None:
    """An export outside its run's directory is allowed, and marked with the run that wrote it; another run pointed at
    it is refused while that run records it. Before: the second assembly replaced the first one's model silently."""
    from splitllama.results import read_results

    models = tmp_path / "models" / "split"
    common = ("debug=quick", "task=assemble", "logger=none", "adapter.init=random", f"paths.cache_dir={embedded_cache}",
              f"paths.export_dir={models}")
    assert run_main(*common, f"hydra.run.dir={tmp_path / 'a'}") == 0
    assert (models / "config.json").is_file() and read_results(tmp_path / "a")["paths"]["export_dir"] == str(models)
    exported = tree_bytes(models)
    code = run_main(*common, f"hydra.run.dir={tmp_path / 'b'}")
    assert isinstance(code, str) and code.startswith(
        f"error: paths.export_dir={models}: was written by the run in {tmp_path / 'a'} (a task=assemble run with status 'ok' started "), code
    assert code.endswith(f"give a new directory, or leave paths.export_dir to its default (inside this run's directory {tmp_path / 'b'}) "
                         f"(remove {models} first if that run's output may go)")
    assert tree_bytes(models) == exported
    from splitllama.results import OUTPUT_MARK

    assert json.loads((models / OUTPUT_MARK).read_text()) == {"run_dir": str(tmp_path / "a")}


# ------------------------------------------------------------------ what is recorded is what ran
def test_results_json_records_what_the_trainer_ran(run_py: RunPy, tmp_path: Path) -> None:
    """Before: ``trainer.precision=16`` on a CPU trained in bf16-mixed while results.json said 16; with
    ``accumulate_grad_batches=2`` validation came every val_check_interval *batches* (twice as often as configured)
    and nothing recorded the effective batch; ``data.max_val_blocks`` above the split's blocks validated on fewer,
    unsaid; a warmup as long as the run went by without a word. Now results.json's ``ran`` says what ran and
    ``warnings`` each setting that defeats part of itself."""
    import csv

    from splitllama.results import read_results

    run_dir = tmp_path / "run"
    run_py.inline("debug=quick", "logger=csv", "eval.references=false", "task.eval_before=false", "adapter.init=random",
                  "task.export=false", "trainer.precision=16", "trainer.accumulate_grad_batches=2", "trainer.max_steps=2",
                  "trainer.val_check_interval=1", "trainer.checkpoint_every_n_steps=4", "optim.warmup_steps=2", "data.batch_size=2",
                  "data.val_fraction=0.001", "data.max_val_blocks=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    results = read_results(run_dir)
    ran = results["ran"]
    assert ran["precision"] == "bf16-mixed" and results["config"]["trainer"]["precision"] == "16"
    assert (ran["accelerator"], ran["devices"], ran["world_size"]) == ("cpu", 1, 1)
    assert ran["batch"] == {"per_replica": 2, "accumulate_grad_batches": 2, "data_parallel": 1, "effective": 4, "tokens_per_step": 256}
    assert ran["schedule"]["warmup_steps"] == 2 and ran["schedule"]["validate_every_steps"] == 1
    blocks = ran["val_blocks"]
    assert 1 <= blocks < 1000
    assert results["warnings"] == [
        "optim.warmup_steps=2 >= trainer.max_steps=2: the learning rate warms up for the whole run, reaching 100% of optim.lr=0.001 "
        "at the last step, and never decays; give optim.warmup_steps below 2 (a tenth of the steps is usual) for the schedule to run",
        "trainer.checkpoint_every_n_steps=4 > trainer.max_steps=2: no checkpoint before training ends (a crash restarts it from "
        "step 0; a signal still checkpoints); give trainer.checkpoint_every_n_steps <= 2",
        "trainer.precision=16: Lightning runs bf16-mixed here (cpu; fp16 mixed precision needs a GPU), and results.json's "
        "ran.precision records that; give trainer.precision=bf16-mixed to ask for what runs, or run on a GPU for fp16",
        f"data.max_val_blocks=1000: the validation split holds {blocks} blocks, so the run validates on {blocks} (results.json's "
        "ran.val_blocks); raise data.val_fraction for more",
    ]
    with open(results["paths"]["metrics_csv"]) as f:
        validations = [row for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(validations) == 2  # at each of the 2 optimizer steps (Lightning counted batches: 4 passes)


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.stop_after_steps=8"], "task.stop_after_steps=8: must be below trainer.max_steps=8: training ends there first (and exports), "
                                  "so the stop would never happen; give a step below 8, or null for a whole run"),
    (["trainer.precision=banana"], "trainer.precision=banana: must be one of 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, "
                                   "transformer-engine, transformer-engine-float16, 32, 16, bf16, 64 (trainer=bf16 sets bf16-mixed for a "
                                   "GPU; 32-true runs anywhere)"),
    (["trainer.nonfinite_patience=-1"], "trainer.nonfinite_patience=-1: must be >= 0 (optimizer steps with a non-finite loss before the "
                                        "run stops as diverged; 0: at the first)"),
], ids=["a stop that never comes", "a precision Lightning has not", "negative patience"])
def test_settings_that_defeat_themselves_are_refused_before_work(overrides: list[str], message: str) -> None:
    """Before: a stop after the last step ran a whole run and exported it; ``precision=banana`` failed in Lightning's
    Trainer, after the donors and data were loaded, with a message naming no setting."""
    from splitllama.errors import RunConfigError
    from splitllama.run.checks import validate

    with pytest.raises(RunConfigError, match="^" + re.escape(message) + "$"):
        validate(compose_run_config("debug=quick", *overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.warmup_steps=10"], "optim.warmup_steps=10 >= trainer.max_steps=8: the learning rate warms up for the whole run, reaching "
                                "80% of optim.lr=0.001 at the last step, and never decays; give optim.warmup_steps below 8 (a tenth of the "
                                "steps is usual) for the schedule to run"),
    (["trainer.val_check_interval=20"], "trainer.val_check_interval=20 > trainer.max_steps=8: no validation during training, only the "
                                        "final one; give trainer.val_check_interval <= 8 for a validation curve"),
    (["trainer.checkpoint_every_n_steps=20"], "trainer.checkpoint_every_n_steps=20 > trainer.max_steps=8: no checkpoint before training "
                                              "ends (a crash restarts it from step 0; a signal still checkpoints); give "
                                              "trainer.checkpoint_every_n_steps <= 8"),
    (["trainer.log_every_n_steps=20"], "trainer.log_every_n_steps=20 > trainer.max_steps=8: no training step is logged; give "
                                       "trainer.log_every_n_steps <= 8"),
], ids=["warmup past the run", "validation past the run", "checkpoint past the run", "logging past the run"])
def test_settings_that_defeat_part_of_themselves_are_warned_before_work(overrides: list[str], message: str) -> None:
    """Each ran without a word before (the warmup case: the learning rate never reached its peak). A warning names
    the setting, what it does to the run and the fix; run.py records it in results.json (see the test above)."""
    from splitllama.run.settings import setting_warnings

    cfg = compose_run_config("debug=quick", *overrides)
    assert setting_warnings(cfg) == [message]
    assert setting_warnings(compose_run_config("debug=quick")) == []
