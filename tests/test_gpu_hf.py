"""The HF backend on 2 GPUs through run.py: DDP and FSDP2 sharding equal one GPU (``-m gpu``).

Run on the device machine by ``scripts/gpu.sh tests``. Same global batch everywhere: one GPU
with ``data.batch_size=8``, two with 4 each. Tolerance 1e-4 nats in float32 (NCCL's reduction
order differs from a single GPU's sum); bf16 compute is compared against its own float32 run
(within 0.05, and at least 75% of float32's drop in validation loss). Every job is bounded (``parallel.timeout_s``, ``trainer.hang_timeout_s``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitllama.results import read_results

GPU = ("debug=quick", "logger=csv", "parallel.timeout_s=240", "trainer.hang_timeout_s=240")
TWO = ("parallel.accelerator=gpu", "parallel.devices=2", "data.batch_size=4")


def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.fail("the gpu tests need 2 CUDA GPUs (run them on the device machine: scripts/gpu.sh)")


@pytest.fixture(scope="module")
def one_gpu(run_py: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("hf_one_gpu")
    run_py(*GPU, "finetune=last", "parallel=single", "parallel.accelerator=gpu", "data.batch_size=8",
           f"hydra.run.dir={run_dir}", cwd=run_dir, timeout=600)
    return run_dir


def _eval_export_on_cpu(run_py: Any, run_dir: Path, tmp_path: Path) -> float:
    out = tmp_path / f"eval_{run_dir.name}"
    run_py("debug=quick", "logger=csv", "task=eval", f"task.model_dir={run_dir / 'hf_model'}", "parallel.accelerator=cpu",
           f"hydra.run.dir={out}", cwd=tmp_path, timeout=600)
    return read_results(out)["metrics"]["val_loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_hf_on_two_gpus_equals_one_gpu(parallel: str, one_gpu: Path, run_py: Any, tmp_path: Path) -> None:
    """``finetune=last`` (frozen first layers, trainable last layers): stopped at step 4 and resumed, the
    2-GPU run ends at the one-GPU run's loss with the same counts; its export scores the same on CPU."""
    _two_gpus()
    run_dir = tmp_path / parallel
    args = (*GPU, "finetune=last", f"parallel={parallel}", *TWO, f"hydra.run.dir={run_dir}")
    run_py(*args, "task.stop_after_steps=4", cwd=tmp_path, timeout=600)
    run_py(*args, "ckpt_path=last", cwd=tmp_path, timeout=600)
    one, two = read_results(one_gpu), read_results(run_dir)
    assert two["status"] == "ok", two.get("error")
    assert two["metrics"]["steps"] == 8 and two["params"] == one["params"]
    assert two["metrics"]["train_tokens_seen"] == one["metrics"]["train_tokens_seen"]
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], abs=1e-4)
    assert one["metrics"]["val_loss"] < one["metrics"]["val_loss_before"] - 1e-3
    assert _eval_export_on_cpu(run_py, run_dir, tmp_path) == pytest.approx(two["metrics"]["val_loss"], abs=1e-4)


@pytest.mark.gpu
def test_fsdp_bf16_activation_checkpointing_all_layers(run_py: Any, tmp_path: Path) -> None:
    """Everything trains, gathered and computed in bf16 (float32 master weights), with activation
    checkpointing: close to the float32 sharded run, and the export (float32 weights) reloads."""
    _two_gpus()
    runs = {}
    for name, extra in {"fp32": (), "bf16": ("parallel.fsdp_param_dtype=bfloat16", "backend.gradient_checkpointing=true")}.items():
        run_dir = tmp_path / name
        run_py(*GPU, "finetune=all", "parallel=fsdp", *TWO, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600)
        runs[name] = read_results(run_dir)
        assert runs[name]["status"] == "ok", runs[name].get("error")
    assert runs["bf16"]["metrics"]["val_loss"] == pytest.approx(runs["fp32"]["metrics"]["val_loss"], abs=0.05)
    # trained like fp32, not barely: most of fp32's drop in validation loss (an absolute 0.01 could not tell)
    gain = {name: run["metrics"]["val_loss_before"] - run["metrics"]["val_loss"] for name, run in runs.items()}
    assert gain["fp32"] > 0 and gain["bf16"] > 0.75 * gain["fp32"], gain
    assert _eval_export_on_cpu(run_py, tmp_path / "bf16", tmp_path) == pytest.approx(runs["bf16"]["metrics"]["val_loss"], abs=0.05)
