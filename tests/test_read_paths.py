"""Every file is checked where it is first read (issue 32, item 3), and the errors that did not say what to do.

Each path that opens a donor, a saved model, a tokenizer or a data file goes through one check,
:func:`splitllama.checkpoint.check_model_dir` (config, index and every JSON a loader reads parse; every shard
the index names exists; each safetensors header parses and its tensors fill the file exactly), before anything
heavy: both donors before either is scored, a saved model before a task loads it, the vLLM and Megatron loaders
before an engine or a process group. Each test damages a real file (truncated bytes, a cut JSON, a FIFO, a
symlink loop) and runs the real code path (``run.py`` in this process, the loaders themselves).

Also: a damaged ``adapter.checkpoint`` and tokenised-corpus cache, a cache directory that is a file or not
writable, two sweeps started in the same second, and ``task=eval`` of a model whose weights are NaN. The list of
read paths and the check each goes through is in ``splitllama/checkpoint.py:check_model_dir``'s callers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitllama.checkpoint import CheckpointError
from splitllama.errors import RunConfigError

from tests.conftest import REPO, compose_run_config, run_in_process


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def run(*overrides: str) -> tuple[int, str]:
    ended = run_in_process("debug=quick", "logger=none", *overrides, ok=False)
    return ended.returncode, ended.message


# ------------------------------------------------------------------ donors: both checked before either is read
@pytest.fixture()
def user_donors(embedded_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The debug=quick embedded donors (with their tokenizers), copied where a test may damage them, given as user donors."""
    from splitllama.run.donors import resolve_donors

    built = resolve_donors(compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}"))
    return (Path(shutil.copytree(built.path8b, tmp_path / "small")), Path(shutil.copytree(built.path70b, tmp_path / "large")))


def _index_for(donor: Path) -> Path:
    """The donor's single file described by a safetensors index (as a sharded checkpoint is)."""
    names = list(load_file(donor / "model.safetensors"))
    index = donor / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    return index


DONOR_DAMAGE = {
    # what is damaged -> (how, the message after "<file>: ")
    "truncated shard": (lambda d: truncate(d / "model.safetensors"), r"truncated: tensors need \d+ bytes of data but the file holds \d+"),
    "truncated index": (lambda d: truncate(_index_for(d)), r"is not valid JSON \(.*\): truncated or corrupt"),
    "index names a missing shard": (lambda d: _missing_shard(d), None),
    "truncated tokenizer.json": (lambda d: truncate(d / "tokenizer.json"), r"is not valid JSON \(.*\): truncated or corrupt"),
}


def _missing_shard(donor: Path) -> Path:
    index = _index_for(donor)
    shard = donor / "model-00001-of-00002.safetensors"
    shutil.move(donor / "model.safetensors", shard)
    value = json.loads(index.read_text())
    value["weight_map"] = {n: ("model-00002-of-00002.safetensors" if i % 2 else shard.name) for i, n in enumerate(value["weight_map"])}
    index.write_text(json.dumps(value))
    return donor / "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("damage", list(DONOR_DAMAGE))
def test_a_damaged_large_donor_fails_naming_the_file_before_either_donor_is_scored(user_donors: tuple[Path, Path], tmp_path: Path,
                                                                                    damage: str) -> None:
    """Before: the small donor was scored (minutes on a real one), then a raw SafetensorError / JSONDecodeError came
    from scoring the large one. Now both are checked first: the error names the setting, the file and a way forward,
    and nothing was scored, tokenised or cached."""
    small, large = user_donors
    how, message = DONOR_DAMAGE[damage]
    file = how(large)
    cache = tmp_path / "cache"
    code, ended = run("task=train", f"donors.path8b={small}", f"donors.path70b={large}", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.cache_dir={cache}")
    assert code == 1, ended
    if message is None:
        message = rf"shard {re.escape(str(file))} listed in model.safetensors.index.json is missing"
        assert re.match(rf"error: donors\.path70b={re.escape(str(large))}: {message}\. Download or copy that checkpoint again", ended), ended
    else:
        assert re.match(rf"error: donors\.path70b={re.escape(str(large))}: {re.escape(str(file))}:? {message}\. Download or copy "
                        rf"that checkpoint again, or give another donors\.path70b$", ended), ended
    assert not cache.exists()  # no donor scored, no corpus tokenised
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["error"]["type"] == "CheckpointError"


def test_task_assemble_checks_both_donors_first(user_donors: tuple[Path, Path], tmp_path: Path) -> None:
    small, large = user_donors
    file = truncate(small / "generation_config.json")
    code, ended = run("task=assemble", f"donors.path8b={small}", f"donors.path70b={large}", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.cache_dir={tmp_path / 'cache'}")
    assert code == 1 and ended.startswith(f"error: donors.path8b={small}: {file} is not valid JSON ("), ended
    assert not (tmp_path / "run" / "hf_model").exists()


# ------------------------------------------------------------------ a saved split model: eval, generate, grpo
@pytest.fixture(scope="module")
def assembled(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split model saved by ``task=assemble`` (with its tokenizer) from copies of the debug=quick donors."""
    from splitllama.run.donors import resolve_donors

    root = tmp_path_factory.mktemp("assembled")
    built = resolve_donors(compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}"))
    small, large = shutil.copytree(built.path8b, root / "small"), shutil.copytree(built.path70b, root / "large")
    run_in_process("debug=quick", "logger=none", "task=assemble", f"donors.path8b={small}", f"donors.path70b={large}",
                   f"hydra.run.dir={root / 'run'}", f"paths.cache_dir={embedded_cache}")
    return root / "run" / "hf_model"


@pytest.fixture()
def saved_model(assembled: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(assembled, tmp_path / "hf_model"))


TASK_OVERRIDES = {"eval": ["task=eval"], "generate": ["task=generate", "task.engine=hf"], "grpo": ["task=grpo"]}


@pytest.mark.parametrize(("task", "damaged", "message"), [
    ("eval", "model.safetensors", r"truncated: tensors need \d+ bytes of data but the file holds \d+"),
    ("generate", "model.safetensors", r"truncated: tensors need \d+ bytes of data but the file holds \d+"),
    ("grpo", "model.safetensors", r"truncated: tensors need \d+ bytes of data but the file holds \d+"),
    ("eval", "tokenizer.json", r"is not valid JSON \(.*\): truncated or corrupt"),
    ("generate", "config.json", r"is not valid JSON \(.*\): truncated or corrupt"),
])
def test_a_damaged_saved_model_fails_naming_the_file_before_it_is_loaded(saved_model: Path, tmp_path: Path, task: str, damaged: str,
                                                                         message: str) -> None:
    """Before: ``task=eval`` of a truncated hf_model ended in a raw SafetensorError from the middle of the load."""
    file = truncate(saved_model / damaged)
    code, ended = run(*TASK_OVERRIDES[task], f"task.model_dir={saved_model}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1, ended
    assert re.match(rf"error: task\.model_dir={re.escape(str(saved_model))}: {re.escape(str(file))}:? {message}\. Export it again "
                    r"\(task=assemble, or the training run that saved it\), or give another task\.model_dir$", ended), ended


def test_eval_checks_the_saved_models_donors_before_scoring_them(assembled: Path, tmp_path: Path) -> None:
    """A saved model is compared with the donors its config names (eval.references): a damaged one is named, not
    met as a SafetensorError after the other donor was scored."""
    model = Path(shutil.copytree(assembled, tmp_path / "hf_model"))
    small, large = shutil.copytree(assembled.parents[1] / "small", tmp_path / "small"), shutil.copytree(assembled.parents[1] / "large", tmp_path / "large")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "path8b": str(small), "path70b": str(large)}))
    shard = truncate(Path(large) / "model.safetensors")
    cache = tmp_path / "cache"
    code, ended = run("task=eval", f"task.model_dir={model}", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={cache}")
    assert code == 1, ended
    assert re.match(rf"error: task\.model_dir={re.escape(str(model))}: its donor path70b={re.escape(str(large))}: {re.escape(str(shard))}: "
                    r"truncated: .*\. Restore that donor, or set eval\.references=false", ended), ended
    assert not cache.exists()  # neither donor scored, no corpus tokenised


# ------------------------------------------------------------------ the engines' loaders
def test_the_vllm_loader_checks_the_model_dir_before_an_engine_starts(saved_model: Path) -> None:
    """Before: a truncated config.json was a raw JSONDecodeError naming no file."""
    from splitllama.vllm.inference import load_llm

    file = truncate(saved_model / "config.json")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"model_dir={saved_model}: {file} is not valid JSON (")):
        load_llm(saved_model)


def test_the_vllm_loader_names_a_truncated_tokenizer(saved_model: Path) -> None:
    from splitllama.vllm.inference import load_llm

    file = truncate(saved_model / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"model_dir={saved_model}: {file} is not valid JSON (")):
        load_llm(saved_model)


def test_the_megatron_loader_checks_its_files_before_any_process_group(saved_model: Path, small_donor: Path, large_donor: Path,
                                                                       tmp_path: Path) -> None:
    """Before: a truncated config.json of hf_split_dir came out of transformers as an OSError; a truncated donor shard
    only once megatron's parallel groups were up."""
    from tests.conftest import import_extra

    import_extra("megatron.core", "megatron-core", "megatron")
    import torch.distributed as dist

    from splitllama.megatron.model import build_megatron_split_model

    was_initialised = dist.is_initialized()
    file = truncate(saved_model / "config.json")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"hf_split_dir={saved_model}: {file} is not valid JSON (")):
        build_megatron_split_model(hf_split_dir=saved_model)
    large = Path(shutil.copytree(large_donor, tmp_path / "large"))
    shard = truncate(sorted(large.glob("model-*.safetensors"))[-1])
    from splitllama import SplitLlamaConfig

    split = SplitLlamaConfig(path8b=str(small_donor), path70b=str(large), num_layers_8=2, num_layers_70=3)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"path70b={large}: {shard}: truncated: ")):
        build_megatron_split_model(split)
    assert dist.is_initialized() == was_initialised  # refused before megatron set up its groups


# ------------------------------------------------------------------ data files
def test_a_fifo_as_a_data_file_is_named_not_waited_on(tmp_path: Path) -> None:
    """Before: reported as "does not exist" (is_file() is false for a FIFO); opened, it would wait for a writer for ever."""
    from splitllama.data import read_text_files

    fifo = tmp_path / "docs.txt"
    os.mkfifo(fifo)
    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {fifo} is a FIFO (named pipe), not a regular file; ")):
        read_text_files([str(fifo)])


def test_a_looping_or_dangling_symlink_as_a_data_file_is_named_as_such(tmp_path: Path) -> None:
    """Before: both were "does not exist", which sends the user looking for a file that is there."""
    from splitllama.data import read_text_files

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {a} is a symbolic link that loops")):
        read_text_files([str(a)])
    dangling = tmp_path / "docs.txt"
    dangling.symlink_to(tmp_path / "moved.txt")
    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {dangling} is a symbolic link to {tmp_path / 'moved.txt'}, "
                                                             "which does not exist")):
        read_text_files([str(dangling)])


def test_an_unreadable_data_file_is_named(tmp_path: Path) -> None:
    """Before: a raw PermissionError / OSError from ``read_bytes``, naming no setting. As root permissions do not stop a
    read, so the unreadable file is one no user can read: /proc/self/mem, a regular file whose offset 0 is unmapped (EIO)."""
    from splitllama.data import read_text_files

    if os.geteuid() != 0:
        path = tmp_path / "docs.txt"
        path.write_text("a document")
        path.chmod(0)
    else:
        path = Path("/proc/self/mem")
        if not path.exists():
            pytest.skip("no /proc/self/mem here (not Linux)")
    with pytest.raises(RunConfigError, match="^" + re.escape(f"data.files: {path} cannot be read (") + r".*\); check its permissions"):
        read_text_files([str(path)])


# ------------------------------------------------------------------ the cache directory
def test_a_cache_dir_that_is_a_file_is_refused_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: SPLITLLAMA_CACHE=<a file> failed at the first write (FileExistsError / NotADirectoryError), naming no setting."""
    from splitllama.run.checks import validate

    file = tmp_path / "cache"
    file.write_text("not a directory")
    monkeypatch.setenv("SPLITLLAMA_CACHE", str(file))
    with pytest.raises(RunConfigError, match="^" + re.escape(f"paths.cache_dir={file} (from $SPLITLLAMA_CACHE): {file} names a file, "
                                                             "not a directory; the cache must be a directory this user can write. "
                                                             "Set SPLITLLAMA_CACHE")):
        validate(compose_run_config("debug=quick"))
    with pytest.raises(RunConfigError, match="^" + re.escape(f"paths.cache_dir={file / 'sub'}: {file / 'sub'} cannot be made: {file} is a "
                                                             "file, not a directory")):
        validate(compose_run_config("debug=quick", f"paths.cache_dir={file / 'sub'}"))


def test_a_read_only_cache_dir_is_refused_naming_the_setting() -> None:
    """A shared cache this user cannot write. As root a mode does not stop a write, so the check runs as the user
    ``nobody`` (a real other user, in a subprocess), on a root-owned directory of mode 755."""
    shared = Path(tempfile.mkdtemp(prefix="splitllama-shared-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        cache = shared / "cache"
        cache.mkdir(mode=0o755)
        if os.geteuid() != 0:
            cache.chmod(0o555)
        script = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('files', sys.argv[1]); "
                  "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                  "print(m.writable_dir_problem(sys.argv[2])); print(m.writable_dir_problem(sys.argv[2] + '/sub'))")
        user = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
        for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):  # one that user may run (files.py needs only the stdlib)
            try:
                out = subprocess.run([python, "-c", script, str(REPO / "splitllama" / "files.py"), str(cache)], capture_output=True,
                                     text=True, check=True, cwd="/", **user).stdout.splitlines()
                break
            except (PermissionError, FileNotFoundError):
                continue
        else:
            pytest.fail("no Python interpreter the user nobody may run (sys.executable, /usr/bin/python3)")
        assert out == [f"{cache} is not writable by this user", f"{cache}/sub cannot be made: {cache} is not writable by this user"], out
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_run_refuses_a_cache_dir_it_cannot_write(tmp_path: Path) -> None:
    """The same check is the run's: ``validate`` names paths.cache_dir (here a path under a file, which root cannot write either)."""
    file = tmp_path / "file"
    file.write_text("")
    code, ended = run(f"paths.cache_dir={file}/cache", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and ended.startswith(f"error: paths.cache_dir={file}/cache: {file}/cache cannot be made: {file} is a file"), ended


# ------------------------------------------------------------------ two sweeps started in the same second
@pytest.mark.parametrize("experiment", [None, "stitch_grid", "stitching_curve", "optuna_layers"])
def test_two_sweeps_started_in_the_same_second_get_their_own_directories(experiment: str | None) -> None:
    """Before: multirun/<date>/<H-M-S> (and the experiments' multirun/<name>/<date>_<H-M-S>): two sweeps started within
    a second shared their job directories (the run-directory claim then refused the second's jobs). The sweep
    directory now carries microseconds."""
    overrides = [f"experiment={experiment}"] if experiment else []
    dirs = {str(compose_run_config(*overrides, hydra_node=True).hydra.sweep.dir) for _ in range(2)}
    assert len(dirs) == 2, dirs
    assert all(re.search(r"\d\d-\d\d-\d\d-\d{6}$", d) for d in dirs), dirs


# ------------------------------------------------------------------ an evaluation that gives NaN is not ok
def test_eval_of_a_model_with_nan_weights_does_not_end_ok(saved_model: Path, tmp_path: Path) -> None:
    """Before: status ok, val_loss NaN. Now status diverged (exit 3), naming the weights."""
    state = load_file(saved_model / "model.safetensors")
    name = next(n for n in state if "adapter" in n)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(saved_model / "model.safetensors"), metadata={"format": "pt"})
    code, ended = run("task=eval", f"task.model_dir={saved_model}", f"hydra.run.dir={tmp_path / 'run'}", "eval.references=false")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert code == 3 and results["status"] == "diverged", (code, ended, results.get("status"))
    assert results["diverged"]["where"] == "eval"
    assert f"gave a validation loss of nan: 1 of its weights hold NaN or infinite values (model.{name}): it is not a usable model" \
        in results["error"]["message"], results["error"]


# ------------------------------------------------------------------ adapter.checkpoint
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_damaged_adapter_checkpoint_fails_naming_the_setting_before_the_run_reads_data(assembled: Path, embedded_cache: Path,
                                                                                        tmp_path: Path, suffix: str) -> None:
    """Before: named only when the assembly read it (after the data was tokenised and both donors scored), as
    ``adapter_checkpoint``, which is not the setting's name."""
    state = {n.removeprefix("model.adapter."): t for n, t in load_file(assembled / "model.safetensors").items() if n.startswith("model.adapter.")}
    file = tmp_path / f"adapter{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(file))
        message = rf"{re.escape(str(file))}: truncated: tensors need \d+ bytes"
    else:
        torch.save(state, file)
        message = re.escape(f"{file} is not a readable checkpoint (truncated or corrupt: ")
    truncate(file)
    code, ended = run("task=assemble", f"adapter.checkpoint={file}", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={embedded_cache}")
    assert code == 1 and re.match(rf"error: adapter\.checkpoint={re.escape(str(file))}: {message}", ended), ended
    assert ended.endswith("give the adapter weights a run saved again, or adapter.checkpoint=null to start the adapter afresh"), ended


# ------------------------------------------------------------------ the tokenised-corpus cache
def test_a_block_cache_with_a_changed_byte_is_tokenised_again_not_loaded(tmp_path: Path) -> None:
    """Before: ``torch.load`` checks no CRC and torch stores tensors uncompressed, so a byte changed in
    ``<cache>/blocks/<key>.pt`` loaded as another token id, silently. Now the archive is checked first."""
    import zipfile

    from transformers import AutoTokenizer

    from splitllama.data import packed_splits
    from splitllama.embedded import SHIPPED_DONORS

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DONORS / "tokenizer")
    documents = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document number {i}" for i in range(200)]
    train, val = packed_splits(tokenizer, documents, 16, 0.1, cache_dir=tmp_path)
    (cache,) = (tmp_path / "blocks").glob("*.pt")
    with zipfile.ZipFile(cache) as archive:  # a byte in the middle of the largest member: the training blocks
        member = max(archive.infolist(), key=lambda m: m.file_size)
    data = bytearray(cache.read_bytes())
    with open(cache, "rb") as f:  # the member's data starts after its local header (30 bytes, name, extra field)
        f.seek(member.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    offset = member.header_offset + 30 + name_len + extra_len + member.compress_size // 2
    data[offset] ^= 0x01
    cache.write_bytes(bytes(data))
    again_train, again_val = packed_splits(tokenizer, documents, 16, 0.1, cache_dir=tmp_path)
    assert torch.equal(again_train, train) and torch.equal(again_val, val)
    with zipfile.ZipFile(cache) as archive:
        assert archive.testzip() is None  # written again, whole


# ------------------------------------------------------------------ the library's common loader
def test_build_split_model_checks_both_donors_whole_before_reading_a_tensor(small_donor: Path, large_donor: Path, tmp_path: Path,
                                                                           tensor_reads: list[str]) -> None:
    """``splitllama.build_split_model`` (the HF backend's assembly, what a library user calls): a damaged JSON of a
    donor is named before any tensor of either is read. Before: never read by the assembly, met later by whatever
    loads the donor with transformers."""
    from splitllama import build_split_model

    large = Path(shutil.copytree(large_donor, tmp_path / "large"))
    file = truncate(large / "generation_config.json")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"path70b: {file} is not valid JSON (")):
        build_split_model(small_donor, large, 2, 3)
    assert tensor_reads == []


# ------------------------------------------------------------------ file systems of their own: read-only, full
@pytest.fixture()
def tmpfs(tmp_path: Path):  # noqa: ANN201
    """``mount(options)``: a tmpfs of its own under ``tmp_path`` (needs root, as the test machines run)."""
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_cache_dir_on_a_read_only_file_system_is_refused_before_anything_heavy(tmpfs, tmp_path: Path) -> None:  # noqa: ANN001
    """A shared cache mounted read-only: refused by the run's first check, as root too (a mode does not stop root,
    a read-only mount does). Before: a raw OSError (EROFS) at the first write, naming no setting."""
    readonly = tmpfs("ro,size=1m")
    code, ended = run(f"paths.cache_dir={readonly}/cache", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and ended.startswith(f"error: paths.cache_dir={readonly}/cache: {readonly}/cache cannot be made: {readonly} is on "
                                          "a read-only file system; the cache must be a directory this user can write"), ended


def test_a_full_disk_while_caching_blocks_or_a_corpus_leaves_no_partial_file(tmpfs) -> None:  # noqa: ANN001
    """Before: the ENOSPC of the cache write failed the run, and left ``<key>.pt.<pid>.tmp`` (``<corpus>.tmp<pid>``)
    behind for good. Now the blocks (documents) are returned from memory, nothing partial stays, a warning says why."""
    from transformers import AutoTokenizer

    from splitllama.data import packed_splits
    from splitllama.embedded import SHIPPED_DONORS, load_stdlib_corpus

    full = tmpfs("size=4k")
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DONORS / "tokenizer")
    documents = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document number {i}" for i in range(200)]
    train, val = packed_splits(tokenizer, documents, 16, 0.1, cache_dir=full)
    assert train.shape[1] == 16 and len(train) > 10
    assert [p.name for p in full.rglob("*") if p.is_file()] == []
    assert len(load_stdlib_corpus(full, 80, progress=False)) > 1000
    assert [p.name for p in full.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------ score caches: a damaged entry is scored again
@pytest.mark.parametrize("damage", ["truncated", "no scores"])
def test_a_damaged_harness_reference_entry_is_scored_again_not_trusted(embedded_cache: Path, tmp_path: Path, damage: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Before: a donor's cached downstream scores (``<cache>/harness_references/<key>.json``) were read with a bare
    ``json.loads``: a truncated entry (a full disk, a killed write) ended every later run with a JSONDecodeError naming
    no file, and an entry without scores with a KeyError later. Now the entry is named in a warning and scored again."""
    from splitllama.harness import HarnessSettings, donor_references, prepare_tasks
    from splitllama.run.donors import load_tokenizer, resolve_donors

    built = resolve_donors(compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}"))
    prepared = prepare_tasks(HarnessSettings(tasks=("stdlib_docstring_name",), limit=4, bootstrap_iters=0), embedded_cache,
                             corpus="stdlib_docstrings")
    donors, cache = {"small": built.path8b, "large": built.path70b}, tmp_path / "cache"
    first = donor_references(donors, load_tokenizer(built.path8b), prepared, cache)
    assert [first[w]["cached"] for w in donors] == [False, False]
    small_file = cache / "harness_references" / f"{first['small']['key']}.json"
    small_file.write_text(small_file.read_text()[:40] if damage == "truncated" else json.dumps({"donor": "x"}))
    with caplog.at_level("WARNING", logger="splitllama.harness"):
        again = donor_references(donors, load_tokenizer(built.path8b), prepared, cache)
    assert (again["small"]["cached"], again["large"]["cached"]) == (False, True)
    assert again["small"]["scores"] == first["small"]["scores"]
    assert f"donor reference {small_file} unreadable" in caplog.text
    assert json.loads(small_file.read_text())["scores"] == first["small"]["scores"]  # written whole again
