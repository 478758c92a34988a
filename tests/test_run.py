"""``run.py`` driven as a user drives it, with Hydra overrides: in this process (``RunPy.inline``, run.py
itself through ``runpy``), and as a subprocess where the process is what a test is about (exit status and
message, signals, SLURM requeue, two DDP ranks, vLLM's engine).

Every run uses ``debug=quick`` (the embedded donors' quick recipe, 8 training steps) and the
session's donor cache (conftest's ``embedded_cache``): these tests check the plumbing of the
experiment loop (training, logging, checkpoints, resume, export, errors), not the numbers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from splitllama.results import read_results
from tests.wandb_offline import find_run_file, read_offline_run

from tests.conftest import REPO, RunPy, run_py_checks

QUICK = "debug=quick"


@pytest.fixture(scope="module")
def default_run(run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default experiment (linear adapter, next-token loss, adapter only, W&B offline), quick."""
    run_dir = tmp_path_factory.mktemp("default_run")
    run_py.inline(QUICK, f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(read_results(run_dir)["paths"]["metrics_csv"], newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


# ------------------------------------------------------------------ the default run
def test_default_run_writes_results(default_run: Path) -> None:
    results = read_results(default_run)
    assert results["status"] == "ok" and results["task"] == "train"
    metrics = results["metrics"]
    assert metrics["steps"] == 8
    # 8 steps on barely-trained donors from the least-squares start (the default init): the plumbing, not a gain;
    # that the default split gains on the shipped donors is the CI's first-run check (README command 1)
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] != metrics["val_loss_before"], "8 steps should move the split"
    # validation passes: before training, and at steps 4 and 8 (val_check_interval=4); the final loss is
    # the step-8 pass of fit, not a repeat of it
    val = column(read_csv_metrics(default_run), "val/loss")
    assert len(val) == 3 and val[0] == pytest.approx(metrics["val_loss_before"], abs=1e-6)
    assert val[-1] == pytest.approx(metrics["val_loss"], abs=1e-6)
    assert math.isclose(metrics["val_ppl"], math.exp(metrics["val_loss"]), rel_tol=1e-9)
    assert results["config"]["adapter"]["kind"] == "linear"
    # adapter.init: null asks for the default; the record says which it was (least squares here), and so does the analysis
    assert results["config"]["adapter"]["init"] is None and results["split"]["adapter_init"] == "lstsq"
    from splitllama.analysis import load_sweep

    assert load_sweep(default_run)["init"].tolist() == ["lstsq"]
    # the embedded donors' default split: the first 2 of the small donor's 4 layers, the last 4 of the large's 8
    exported = json.loads((default_run / "hf_model" / "config.json").read_text())
    assert (exported["layers_8"], exported["layers_70"], exported["adapter"]) == ([0, 1], [4, 5, 6, 7], "linear")
    # by default the adapter (a 128 -> 256 linear map with bias) and the 4 large layers train (finetune=last):
    # each layer q, k, v, o (8 heads, 2 KV heads of 32), the SwiGLU MLP (896) and its two norms
    layer = 256 * 256 + 2 * 256 * 64 + 256 * 256 + 3 * 256 * 896 + 2 * 256
    assert results["params"]["trainable"] == 128 * 256 + 256 + 4 * layer < results["params"]["total"]
    assert results["flops"]["train_flops_per_token"] > results["flops"]["forward_flops_per_token"] > 0
    assert len(results["git"]["commit"]) == 40
    assert {"donors_s", "assemble_s", "fit_s", "total_s"} <= set(results["timings"])
    assert (default_run / "checkpoints" / "last.ckpt").is_file()
    assert (default_run / "hf_model" / "config.json").is_file()


def test_default_run_logs_its_progress_in_run_log(default_run: Path) -> None:
    """A line per step in run.log (debug=quick: 8 steps, about 10 lines a run, so every step), written through
    Python logging: what a run under nohup or SLURM shows, where the progress bar shows nothing."""
    log = (default_run / "run.log").read_text()
    lines = re.findall(r"step (\d+)/8 \((\d+)%\): loss ([0-9.]+), ([0-9.]+k?) tokens/s, (\d+:\d\d) elapsed(, about \d+:\d\d left \(ETA [0-9:]+\))?", log)
    assert [int(step) for step, *_ in lines] == list(range(1, 9)), log[-3000:]
    assert [int(pct) for _, pct, *_ in lines] == [round(100 * k / 8) for k in range(1, 9)]
    assert all(math.isfinite(float(loss)) for _, _, loss, *_ in lines)
    assert all(eta for *_, eta in lines[:-1]) and not lines[-1][-1]  # time left until the last step
    assert "training 8 steps; a progress line every step" in log


def test_default_run_has_the_donors_as_reference(default_run: Path) -> None:
    """Both donors scored on the run's validation blocks; gap_closed = (small - split) / (small - large)."""
    results = read_results(default_run)
    refs, metrics = results["references"], results["metrics"]
    small, large = refs["small"]["val_loss"], refs["large"]["val_loss"]
    assert refs["small"]["path"] == results["donors"]["path8b"] and refs["large"]["path"] == results["donors"]["path70b"]
    assert refs["val_blocks"] == 16  # debug=quick: data.max_val_blocks=16, the split model's validation blocks
    assert math.isfinite(small) and math.isfinite(large) and small != large
    assert metrics["gap_closed"] == pytest.approx((small - metrics["val_loss"]) / (small - large), rel=1e-9)
    assert metrics["gap_closed_before"] == pytest.approx((small - metrics["val_loss_before"]) / (small - large), rel=1e-9)
    assert "references_s" in results["timings"]


def test_wandb_offline_run_holds_the_logged_metrics(default_run: Path) -> None:
    import psutil

    # the in-process run ended W&B as a run.py process's exit does (run_in_process: wandb.teardown()), so no
    # wandb-core service of this process is left; while one is, the run file's last block can be unwritten
    # (this test once read the file cut at a block edge: tests/wandb_offline.py)
    assert [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"] == []
    results = read_results(default_run)
    run = read_offline_run(find_run_file(default_run / "wandb"))
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl"):
        values = run.column(key)
        assert values and all(math.isfinite(v) for v in values), key
    assert len(run.column("train/loss")) == 8
    # the last validation is the final one results.json reports
    assert run.column("val/loss")[-1] == pytest.approx(results["metrics"]["val_loss"], abs=1e-6)
    assert run.column("params/trainable") == [results["params"]["trainable"]]
    assert run.column("flops/train_per_token")[0] == pytest.approx(results["flops"]["train_flops_per_token"])
    lrs = run.column("train/lr")
    assert lrs[1] > lrs[0] and lrs[-1] < max(lrs)  # warmup, then cosine decay
    assert run.config["adapter"]["kind"] == "linear" and run.config["optim"] == results["config"]["optim"]
    assert run.column("ref/small_val_loss") == [pytest.approx(results["references"]["small"]["val_loss"])]
    assert run.column("ref/large_val_loss") == [pytest.approx(results["references"]["large"]["val_loss"])]
    assert run.column("final/gap_closed") == [pytest.approx(results["metrics"]["gap_closed"])]
    assert {"train", "linear", "lm"} <= set(run.tags)
    # the CSV logger runs beside W&B and records the same validation losses
    assert column(read_csv_metrics(default_run), "val/loss") == pytest.approx(run.column("val/loss"), abs=1e-6)


def test_exported_model_reproduces_the_validation_loss(default_run: Path, run_py: RunPy, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import splitllama

    export = default_run / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert isinstance(model, splitllama.CustomSplitLLamaForCausalLM) and model.config.adapter == "linear"
    # `task=eval` scores the exported checkpoint through from_pretrained, on the same held-out split
    run_py.inline(QUICK, "task=eval", f"task.model_dir={export}", "logger=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    evaluated = read_results(tmp_path)
    assert evaluated["status"] == "ok"
    assert evaluated["metrics"]["val_loss"] == pytest.approx(read_results(default_run)["metrics"]["val_loss"], abs=1e-5)
    # the saved model's config names its donors: they are its reference, scored on the same blocks (cached)
    trained = read_results(default_run)
    assert evaluated["references"]["small"] == {**trained["references"]["small"], "cached": True}
    assert evaluated["metrics"]["gap_closed"] == pytest.approx(trained["metrics"]["gap_closed"], abs=1e-5)


def test_resume_reaches_the_uninterrupted_val_loss(default_run: Path, run_py: RunPy, tmp_path: Path) -> None:
    """Stopped before half the run (where the resumed sampler used to repeat batches) and resumed
    through run.py: the uninterrupted validation loss, exactly; the interrupted attempt is kept."""
    # no logger (the default run beside it logs to W&B): what a run logs to does not enter its training
    run_py.inline(QUICK, "task.stop_after_steps=3", "logger=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    first = read_results(tmp_path)
    assert first["status"] == "interrupted" and first["metrics"]["steps"] == 3
    assert not (tmp_path / "hf_model").exists()  # an interrupted run is not exported
    run_py.inline(QUICK, "ckpt_path=last", "logger=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    resumed, uninterrupted = read_results(tmp_path), read_results(default_run)
    assert resumed["status"] == "ok" and resumed["metrics"]["steps"] == 8
    assert resumed["metrics"]["val_loss"] == uninterrupted["metrics"]["val_loss"]
    assert resumed["metrics"]["val_loss_before"] == uninterrupted["metrics"]["val_loss_before"]  # carried over, not re-measured
    assert [a["status"] for a in resumed["attempts"]] == ["interrupted"]
    assert read_results(tmp_path / resumed["attempts"][0]["record"])["metrics"]["steps"] == 3
    # the donors were scored on these blocks by the default run: read from the cache, the same values
    assert resumed["references"]["large"] == {**uninterrupted["references"]["large"], "cached": True}


# ------------------------------------------------------------------ run directories and records are never lost
def test_runs_started_in_the_same_second_get_their_own_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    """``outputs/${run_id:}``: Hydra's date/time alone gave two runs started in the same second the same
    directory (one results.json and one hf_model survived). Two ids made in one second differ."""
    from splitllama.results import _run_id

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(100):
        first, second = _run_id.__wrapped__(), _run_id.__wrapped__()
        if first[:19] == second[:19]:  # YYYY-MM-DD/HH-MM-SS: the same second
            break
    assert first[:19] == second[:19], (first, second)
    assert first != second
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-[0-9a-f]{6}", first), first


def test_a_used_run_directory_is_refused_and_a_failed_resume_keeps_the_record(default_run: Path, run_py: RunPy, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(default_run, run_dir)
    finished = (run_dir / "results.json").read_bytes()
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    log_size = (run_dir / "run.log").stat().st_size
    proc = run_py(QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False, timeout=300)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in message
    assert (f"error: run directory {run_dir} is in use: results.json records a run with status 'ok' started "
            f"{read_results(run_dir)['started']}. A new run needs its own directory (leave hydra.run.dir to its default), "
            "or resume it with ckpt_path=last") in message, message[-2000:]
    assert (run_dir / "results.json").read_bytes() == finished
    # refused before Hydra wrote into it: its composed config and log are the finished run's
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    assert (run_dir / "run.log").stat().st_size == log_size

    proc = run_py.inline(QUICK, "ckpt_path=last", "optim.lr=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert proc.returncode != 0 and proc.message == "error: optim.lr=-1.0: must be > 0"
    kept = read_results(run_dir)
    assert kept["status"] == "ok" and kept["metrics"] == json.loads(finished)["metrics"]
    (failed,) = kept["attempts"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "optim.lr=-1.0: must be > 0"
    assert read_results(run_dir / failed["record"])["status"] == "failed"


def test_resuming_a_finished_run_says_it_is_complete(default_run: Path, run_py: RunPy, tmp_path: Path) -> None:
    """``ckpt_path=last`` on a run that finished ok with the same settings trains nothing (it redid the whole run):
    it says the run is complete, with its outcome line, exits 0 and leaves results.json as it was. More steps
    without ``task.extend`` are refused, naming the way to train on."""
    run_dir = tmp_path / "run"
    shutil.copytree(default_run, run_dir)
    finished = (run_dir / "results.json").read_bytes()
    checkpoint = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    log_size = (run_dir / "run.log").stat().st_size
    started = time.monotonic()
    run_py.inline(QUICK, "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert time.monotonic() - started < 60, "a finished run was trained again"
    assert (run_dir / "results.json").read_bytes() == finished
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint
    log = (run_dir / "run.log").read_bytes()[log_size:].decode()
    from splitllama.results import outcome_line

    (said,) = [line.split(" - ", 1)[1] for line in log.splitlines() if "already complete" in line]
    assert said.startswith(f"already complete: the run in {run_dir} finished all 8 steps with these settings"), said
    assert said.endswith(f"Its outcome: {outcome_line(json.loads(finished))}"), said
    assert "step 1/8" not in log and "training 8 steps" not in log

    ended = run_py.inline(QUICK, "ckpt_path=last", "trainer.max_steps=12", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert ended.returncode == 1 and "trainer.max_steps: 8 -> 12" in ended.message
    assert "to train past trainer.max_steps=8, resume with task.extend=true" in ended.message


def test_resuming_a_run_stopped_before_its_first_checkpoint_says_what_to_do(default_run: Path, run_py: RunPy, tmp_path: Path) -> None:
    """A run stopped before its first checkpoint left results.json (interrupted) and no checkpoints/: ``ckpt_path=last``
    says there is nothing to resume and how to start over, in the message itself."""
    run_dir = tmp_path / "run"
    shutil.copytree(default_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    results = json.loads((run_dir / "results.json").read_text())
    results.update(status="interrupted", metrics={"steps": 2})  # what a Ctrl-C at step 2 leaves (checkpoints every 4 steps)
    (run_dir / "results.json").write_text(json.dumps(results))
    ended = run_py.inline(QUICK, "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert ended.returncode == 1
    assert ended.message == (f"error: ckpt_path=last: the run in {run_dir} stopped (status 'interrupted') before its first checkpoint "
                             "(at step 2; checkpoints are written every 4 steps, trainer.checkpoint_every_n_steps), so there is "
                             "nothing to resume. Start it again as a new run: the same command without ckpt_path and without "
                             f"hydra.run.dir (a new run directory), or delete {run_dir} and rerun the same command without ckpt_path")


def signal_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, signum: int) -> str:
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "run.py ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signum)
    return proc.communicate(timeout=600)[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_writes_interrupted_with_the_checkpoint(run_py: RunPy, tmp_path: Path, signum: int) -> None:
    """Ctrl-C (SIGINT) or SIGTERM during training: training stops after the step with a checkpoint,
    results.json says ``interrupted`` and names it, the exit status is 128 + the signal number."""
    proc = run_py.start(QUICK, "logger=csv", "trainer.max_steps=40", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    output = signal_after_first_checkpoint(proc, tmp_path, signum)
    assert proc.returncode == 128 + signum, output[-3000:]
    results = read_results(tmp_path)
    assert results["status"] == "interrupted" and results["interrupted_by"] == signal.Signals(signum).name
    assert results["paths"]["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert 4 <= results["metrics"]["steps"] < 40 and "val_loss_before" in results["metrics"]
    assert torch.load(results["paths"]["checkpoint"], weights_only=False)["global_step"] == results["metrics"]["steps"]


@pytest.mark.slow
def test_slurm_preemption_resumes_by_rerunning_the_same_command(run_py: RunPy, tmp_path: Path) -> None:
    """A SLURM job gets ``outputs/slurm-<job id>-<command hash>``; SIGTERM (sent before the kill) stops it
    with a checkpoint; the requeued job (same command, SLURM_RESTART_COUNT=1) resumes and finishes."""
    command = (QUICK, "logger=csv", "trainer.max_steps=12")
    run_dir = tmp_path / "outputs" / f"slurm-4242-{hashlib.sha1(chr(0).join(command).encode()).hexdigest()[:8]}"
    proc = run_py.start(*command, cwd=tmp_path, env={"SLURM_JOB_ID": "4242"})
    signal_after_first_checkpoint(proc, run_dir, signal.SIGTERM)
    assert proc.returncode == 143 and read_results(run_dir)["status"] == "interrupted"
    stopped_at = read_results(run_dir)["metrics"]["steps"]
    run_py.inline(*command, cwd=tmp_path, env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"})
    results = read_results(run_dir)
    assert results["status"] == "ok" and results["metrics"]["steps"] == 12
    assert [(a["status"], a["metrics"]["steps"]) for a in results["attempts"]] == [("interrupted", stopped_at)]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(default_run: Path, run_py: RunPy, embedded_cache: Path, tmp_path: Path) -> None:
    """``parallel=ddp``: two processes (gloo), each rank its own share of the data; validation reduced;
    the default W&B logger (offline) on both ranks (a rank other than 0 once crashed reading its run dir).

    Rank r of 2 takes global samples 2j + r, so two ranks of batch 4 see together what one process
    of batch 8 sees in each step, and train the same model: the loss after training says each rank
    read its own half (two ranks reading the same batches train what one process of batch 4 does)."""
    from tests.test_training import quick_fit

    # the default logger (W&B, offline): on rank 1 its experiment is Lightning's stand-in, which has no run dir.
    # The one-process reference (batch 8, in this process) trains while the two ranks start and train.
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    with run_py.in_background(QUICK, "parallel=ddp", "parallel.devices=2", "parallel.accelerator=cpu",
                 f"hydra.run.dir={ddp_dir}", cwd=ddp_dir, log=tmp_path / "ddp_output") as two_processes:
        doubled, batches = quick_fit(embedded_cache, tmp_path / "batch8", "data.batch_size=8")
        two_processes.wait()
    results, single = read_results(ddp_dir), read_results(default_run)
    assert results["status"] == "ok" and results["metrics"]["steps"] == 8
    # the held-out split scored across two ranks gives the single-process value
    assert results["metrics"]["val_loss_before"] == pytest.approx(single["metrics"]["val_loss_before"], abs=1e-5)
    assert len(batches) == 8 and all(len(b) == 8 for b in batches)
    assert results["metrics"]["val_loss"] == pytest.approx(doubled, abs=2e-5)
    assert abs(results["metrics"]["val_loss"] - single["metrics"]["val_loss"]) > 1e-3
    assert results["metrics"]["train_tokens_seen"] == 2 * single["metrics"]["train_tokens_seen"]


# ------------------------------------------------------------------ the design card's overrides and other recipes
def test_mlp_adapter_with_layer_counts(run_py: RunPy, tmp_path: Path) -> None:
    # with a callback of the user's, added from the command line: Lightning's learning-rate monitor
    run_py.inline(QUICK, "adapter=mlp", "layers.n70=8", "layers.n8=2", "finetune=adapter", "logger=csv", "eval.references=false", f"hydra.run.dir={tmp_path}",
           "+callbacks.extra.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor", cwd=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "ok"
    assert "references" not in results and "gap_closed" not in results["metrics"]  # eval.references=false
    exported = json.loads((tmp_path / "hf_model" / "config.json").read_text())
    assert exported["adapter"] == "mlp" and exported["layers_8"] == [0, 1] and exported["layers_70"] == list(range(8))
    assert exported["num_hidden_layers"] == 10
    hidden = exported["adapter_hidden_size"]
    assert results["params"]["trainable"] == 128 * hidden + hidden + hidden * 256 + 256
    val = column(read_csv_metrics(tmp_path), "val/loss")
    assert val and val[-1] == pytest.approx(results["metrics"]["val_loss"], abs=1e-6)
    assert not (tmp_path / "wandb").exists()
    lr = [v for key in read_csv_metrics(tmp_path)[0] if key.startswith("lr-") for v in column(read_csv_metrics(tmp_path), key)]
    assert lr and max(lr) == pytest.approx(results["config"]["optim"]["lr"]) and lr[-1] < max(lr)  # warmup + cosine, as logged


def test_distillation_and_unreachable_wandb(run_py: RunPy, tmp_path: Path) -> None:
    """KL to the frozen large donor; W&B asked to go online without an account falls back to CSV."""
    # a subprocess: W&B keeps its settings (offline, from earlier runs) in the process that set it up
    run_py(QUICK, "objective=distill", "logger.mode=online", "logger.init_timeout=30", f"hydra.run.dir={tmp_path}",
           cwd=tmp_path, env={"WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    results = read_results(tmp_path)
    assert results["status"] == "ok", results.get("error")
    assert "No API key" in results["logger"]["wandb_error"]
    rows = read_csv_metrics(tmp_path)
    distill = column(rows, "train/distill_loss")
    assert len(distill) == 8 and all(d >= 0 for d in distill)
    assert column(rows, "train/loss") == pytest.approx(distill, rel=1e-5)  # pure distillation: the loss is the KL
    assert column(rows, "val/distill_loss")


def test_lora_on_donor_layers_merges_into_the_export(run_py: RunPy, tmp_path: Path) -> None:
    run_py.inline(QUICK, "finetune=lora", "logger=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "ok"
    assert results["params"]["trainable"] > 128 * 256 + 256  # adapter + LoRA matrices
    from safetensors import safe_open

    with safe_open(tmp_path / "hf_model" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert not [n for n in names if "lora" in n], "LoRA is merged into the donor weights on export"


GENERATE = ("task=generate", "task.max_new_tokens=8", "logger=none")


@pytest.fixture(scope="module")
def hf_generations(default_run: Path, run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``task=generate task.engine=hf`` on the default run's export (greedy), shared by the vLLM comparison."""
    run_dir = tmp_path_factory.mktemp("generate_hf")
    run_py.inline(QUICK, *GENERATE, "task.engine=hf", f"task.model_dir={default_run / 'hf_model'}", f"hydra.run.dir={run_dir}", cwd=run_dir)
    return read_results(run_dir)["generations"]


def test_generate_with_transformers(default_run: Path, hf_generations: dict[str, str]) -> None:
    assert set(hf_generations) == {"Return the number of", "This module provides"}
    # what a user gets calling generate on the export themselves (greedy)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splitllama  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(default_run / "hf_model")
    model = AutoModelForCausalLM.from_pretrained(default_run / "hf_model")
    for prompt, text in hf_generations.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.vllm
def test_generate_with_vllm_matches_transformers(default_run: Path, hf_generations: dict[str, str], run_py: RunPy, tmp_path: Path) -> None:
    from tests.vllm_helpers import ENGINE_ENV

    # the tests' engine environment: VLLM_CPU_CI_ENV=1, vLLM's own CPU-CI switch (Dynamo traced, run eagerly: no
    # Inductor build of a minute), the engine in this process (no engine-core process), no usage-stats report
    run_py(QUICK, *GENERATE, "task.engine=vllm", f"task.model_dir={default_run / 'hf_model'}", f"hydra.run.dir={tmp_path}",
           cwd=tmp_path, env=ENGINE_ENV)
    assert read_results(tmp_path)["generations"] == hf_generations  # greedy, float32, same weights


# ------------------------------------------------------------------ bad input fails at composition, naming the field
BAD_OVERRIDES = [
    (["layers.n70=99"], "layers.n70=99"),
    (["adapter=transformer"], "adapter"),
    (["optim.lr=fast"], "optim.lr"),
    (["trainer.max_step=3"], "trainer.max_step"),
    (["donors=llama3_8b_70b"], "donors.path8b"),
    (["donors.embedded.large.warmup_steps=99999"], "donors.embedded.large.warmup_steps=99999: must be in [0, pretrain_steps="),
    (["parallel.cpu_threads=0"], "parallel.cpu_threads=0"),
    (["donors=llama3_8b_70b", "donors.path8b=/nonexistent/Llama-3-8B", "donors.path70b=/nonexistent/Llama-3-70B"],
     "/nonexistent/Llama-3-8B"),
]


def test_help_names_the_commands_and_the_config_groups(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``python run.py --help`` is the project's help (conf/hydra/help/splitllama.yaml), not Hydra's stock one: the
    main commands, where results go, and every config group with its options (Hydra's $APP_CONFIG_GROUPS)."""
    from tests.conftest import run_in_process

    run_in_process("--help", cwd=tmp_path)
    shown = capfd.readouterr().out
    for command in ("python run.py debug=quick", "python run.py adapter=mlp layers.n70=8", "python run.py task=assemble",
                    "python run.py task=eval task.model_dir=", "python run.py task=generate", "python run.py task=grpo",
                    "python run.py -m adapter=linear,mlp layers.n70=2,4,8", "python run.py ckpt_path=last hydra.run.dir="):
        assert command in shown, command
    assert "outputs/<date>/<time>-<random>/ with results.json" in shown and "multirun/<date>/<time>/<job>/" in shown
    groups = dict(line.split(": ", 1) for line in shown.splitlines() if re.fullmatch(r"[a-z_]+: [a-z0-9_, ]+", line))
    conf = REPO / "conf"
    for group in ("adapter", "donors", "task", "debug", "parallel", "experiment", "objective", "finetune"):
        assert groups[group].split(", ") == sorted(f.stem for f in (conf / group).glob("*.yaml")), group
    assert "Powered by Hydra" not in shown and not (tmp_path / "outputs").exists()  # help runs nothing


@pytest.mark.parametrize(("overrides", "named"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_overrides_fail_naming_the_field(overrides: list[str], named: str) -> None:
    """In-process: what run.py checks first (composition, validation) refuses them, naming the field."""
    with pytest.raises(Exception) as refused:  # noqa: PT011 - Hydra's composition errors, RunConfigError, SplitConfigError
        run_py_checks(*overrides)
    assert type(refused.value).__name__ in ("MissingConfigException", "ConfigCompositionException", "RunConfigError"), refused.value
    assert named in str(refused.value)


# one of each kind through run.py: Hydra's composition error and a validation error end the process with a
# non-zero status and the message, no traceback, nothing written
RUN_PY_REFUSES = [(["adapter=transformer"], "Could not find 'adapter/transformer'"),
                  (["layers.n70=99"], "error: layers.n70=99: must be an integer in 0..")]


@pytest.mark.parametrize(("overrides", "named"), RUN_PY_REFUSES, ids=[" ".join(o) for o, _ in RUN_PY_REFUSES])
def test_run_py_exits_with_the_message_and_no_traceback(run_py: RunPy, tmp_path: Path, overrides: list[str], named: str) -> None:
    proc = run_py(*overrides, f"hydra.run.dir={tmp_path}", cwd=tmp_path, ok=False, timeout=120)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert named in message, message[-3000:]
    assert "Traceback" not in message, message[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def test_assemble_saves_a_loadable_split_model(run_py: RunPy, tmp_path: Path) -> None:
    """``task=assemble``: no training; a least-squares low-rank adapter fitted on calibration blocks."""
    run_py.inline(QUICK, "task=assemble", "adapter=lowrank", "adapter.rank=8", "adapter.init=lstsq", "logger=none",
           f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    results = read_results(tmp_path)
    assert results["status"] == "ok" and results["task"] == "assemble" and results["params"]["trainable"] == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splitllama  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model")
    assert model.config.adapter == "lowrank" and model.config.adapter_rank == 8
    assert model.model.adapter.adapter_linear_1.weight.shape == (8, 128)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf_model").bos_token_id == 1
