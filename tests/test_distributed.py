"""Distributed runs on CPU: ``parallel=fsdp`` (FSDP2 sharding of the HF backend) through run.py on two
processes (gloo), the hang watchdog, which process is the first rank, and the multi-node config.

The same code path runs on GPUs (NCCL); ``tests/test_gpu_hf.py`` repeats the equality there.
Equality to one process: two ranks with ``data.batch_size=4`` each see exactly the eight
sequences one process sees with ``data.batch_size=8`` (the sampler shards each global batch by
rank), and FSDP2 averages gradients over the ranks, so the runs match within float32 reduction
order (tolerance 1e-5 nats).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitllama.results import read_results
from splitllama.training.callbacks import HangWatchdog
from tests.conftest import RunPy, run_py_checks

#: one torch CPU thread in every process of these runs: what Lightning gives each of two ranks on two cores anyway
#: (cores // ranks), here given to the one-process references too; a second OpenMP thread waiting for a core that other
#: work holds (pytest-xdist workers, other jobs) made a debug=quick training 3-7x slower (3.5 s on one thread, 12-24 s on two)
QUICK = ("debug=quick", "logger=csv", "parallel.cpu_threads=1")
FSDP_CPU = ("parallel=fsdp", "parallel.accelerator=cpu", "parallel.devices=2", "parallel.timeout_s=300",
            "trainer.hang_timeout_s=300")
TOL = 1e-5


@pytest.fixture(scope="module")
def last_runs(run_py: RunPy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``finetune=last`` under FSDP on two processes (global batch 8: 4 per rank), and beside it, while its ranks start,
    the reference: one process, global batch 8 (in this process: one process is not what the FSDP tests are about)."""
    base = tmp_path_factory.mktemp("last")
    single, fsdp = base / "single", base / "fsdp"
    single.mkdir(), fsdp.mkdir()
    with run_py.in_background(*QUICK, *FSDP_CPU, "finetune=last", "data.batch_size=4", f"hydra.run.dir={fsdp}", cwd=fsdp,
                 log=base / "fsdp") as two_processes:
        run_py.inline(*QUICK, "finetune=last", "data.batch_size=8", f"hydra.run.dir={single}", cwd=single)
        two_processes.wait()
    return single, fsdp


@pytest.fixture(scope="module")
def single_last(last_runs: tuple[Path, Path]) -> Path:
    """The reference: one process, global batch 8, the last large layers train."""
    return last_runs[0]


@pytest.fixture(scope="module")
def fsdp_last(last_runs: tuple[Path, Path]) -> Path:
    return last_runs[1]


@pytest.mark.slow
def test_fsdp_equals_one_process(single_last: Path, fsdp_last: Path) -> None:
    """Frozen donor layers and trainable last layers sharded together train as one process does."""
    one, two = read_results(single_last), read_results(fsdp_last)
    assert two["status"] == "ok", two.get("error")
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    assert two["metrics"]["train_tokens_seen"] == one["metrics"]["train_tokens_seen"]
    assert two["params"] == one["params"]  # whole-model counts, not one rank's shard
    assert two["metrics"]["val_loss_before"] == pytest.approx(one["metrics"]["val_loss_before"], abs=TOL)
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], abs=TOL)
    assert one["metrics"]["val_loss"] < one["metrics"]["val_loss_before"] - 1e-3  # it did train
    # checkpoints are sharded: one file per rank plus Lightning's metadata
    last = fsdp_last / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2


@pytest.mark.slow
def test_fsdp_export_reloads_to_the_same_loss(fsdp_last: Path, run_py: RunPy, tmp_path: Path) -> None:
    """The export gathers the shards into one ordinary HF split checkpoint; scored alone it gives the run's loss."""
    results = read_results(fsdp_last)
    export = Path(results["paths"]["export_dir"])
    index = export / "model.safetensors"
    assert index.is_file(), sorted(p.name for p in export.iterdir())
    run_py.inline(*QUICK, "task=eval", f"task.model_dir={export}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert read_results(tmp_path)["metrics"]["val_loss"] == pytest.approx(results["metrics"]["val_loss"], abs=TOL)


@pytest.mark.slow
def test_fsdp_lora_resumes_exactly_and_exports_merged(run_py: RunPy, tmp_path: Path) -> None:
    """LoRA under FSDP2: stopped at step 4 and resumed from the sharded checkpoint, the run ends where one
    process that trains the same LoRA on the same global batches (8, uninterrupted) ends: equal within float32
    reduction order (1e-5 nats, the reasoning of the module docstring), so neither the resume nor the sharding
    of LoRA's weights changed the run (measured: 2e-7 apart; a resume that zeroes Adam's moments ends 1.5e-3 away,
    one that restarts the learning-rate schedule 5.4e-3); the export has LoRA merged in (plain split-model tensor names)."""
    single, parts = tmp_path / "single", tmp_path / "parts"
    args = (*QUICK, *FSDP_CPU, "finetune=lora", "data.batch_size=4")
    # the first part on two processes, and beside it, while its ranks start, the one-process reference
    with run_py.in_background(*args, "task.stop_after_steps=4", f"hydra.run.dir={parts}", cwd=tmp_path, log=tmp_path / "part1") as part1:
        run_py.inline(*QUICK, "finetune=lora", "data.batch_size=8", f"hydra.run.dir={single}", cwd=tmp_path)
        part1.wait()
    assert (parts / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    assert read_results(parts)["status"] == "interrupted" and read_results(parts)["metrics"]["steps"] == 4
    run_py(*args, "ckpt_path=last", f"hydra.run.dir={parts}", cwd=tmp_path)
    one, two = read_results(single), read_results(parts)
    assert two["status"] == "ok" and two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    assert two["resume"]["from_step"] == 4
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], abs=TOL)
    (stopped,) = two["attempts"]
    assert two["metrics"]["val_loss"] < stopped["metrics"]["val_loss"] - 1e-3  # steps 5-8 trained (0.0057 nats here)
    from safetensors import safe_open

    with safe_open(str(parts / "hf_model" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("lora" in n or "base_layer" in n for n in names)
    assert json.loads((parts / "hf_model" / "config.json").read_text())["architectures"] == ["CustomSplitLLamaForCausalLM"]


def test_fsdp_refuses_bad_settings() -> None:
    """Checked when the config is composed, before any process starts, naming the field (in-process:
    test_run.py checks how run.py reports such an error)."""
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError, match=re.escape("parallel.fsdp_sharding_strategy=HYBRID: must be one of ['FULL_SHARD', 'SHARD_GRAD_OP']")):
        run_py_checks(*QUICK, *FSDP_CPU, "parallel.fsdp_sharding_strategy=HYBRID")
    with pytest.raises(RunConfigError, match=re.escape("parallel.strategy=fsdp: shards the HF backend")):
        run_py_checks(*QUICK, *FSDP_CPU, "backend=megatron")


def test_megatron_multinode_config_composes(tmp_path: Path) -> None:
    """``experiment=megatron_multinode``: SLURM launcher sized from the parallel layout, settings valid,
    TP=8 dividing real Llama-3 heads (8B: 32 / 8 KV, 70B: 64 / 8 KV); no process, no weights."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from splitllama import SplitLlamaConfig
    from tests.donors import llama_config
    from splitllama.backend.spec import backend_spec
    from splitllama.run.schema import register_configs
    from splitllama.run.settings import validate_run_settings
    from tests.conftest import REPO

    register_configs()
    (tmp_path / "8B").mkdir()
    (tmp_path / "70B").mkdir()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=megatron_multinode", "donors=llama3_8b_70b",
                                                      f"donors.path8b={tmp_path / '8B'}", f"donors.path70b={tmp_path / '70B'}"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert (cfg.backend.name, cfg.backend.tp, cfg.backend.pp, cfg.backend.sp) == ("megatron", 8, 2, True)
    validate_run_settings(cfg)
    shapes = dict(vocab_size=256, head_dim=128, num_key_value_heads=8)
    split = SplitLlamaConfig(config_8b=llama_config(hidden_size=4096, num_attention_heads=32, num_hidden_layers=2, **shapes),
                             config_70b=llama_config(hidden_size=8192, num_attention_heads=64, num_hidden_layers=2, **shapes),
                             num_layers_8=1, num_layers_70=1)
    backend_spec(cfg).check_split(split, cfg)  # TP divides the heads (megatron's own check)


# ------------------------------------------------------------------ a stuck run fails with its stacks (trainer.hang_timeout_s)
STUCK_RUN = textwrap.dedent("""
    import time
    import torch
    import lightning.pytorch as pl
    from splitllama.training.callbacks import HangWatchdog

    class Stuck(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                time.sleep(120)  # stands in for a collective some rank never joins
            return self.layer(batch).sum()
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[HangWatchdog(3)])
    trainer.fit(Stuck())
    print("finished")
""")


def test_hang_watchdog_dumps_stacks_and_exits(tmp_path: Path) -> None:
    """A training step that never returns: within the timeout the process prints the stuck frame and exits 1."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RUN)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "finished" not in proc.stdout
    assert "Timeout" in proc.stderr and "in training_step" in proc.stderr, proc.stderr[-3000:]


def test_hang_watchdog_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match=r"trainer.hang_timeout_s=0: must be > 0 seconds"):
        HangWatchdog(0)


def test_first_rank_claims_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first rank claims the run directory and writes results.json: Lightning's later ranks,
    torchrun's, and the tasks of a multi-task SLURM job (one rank each) are not it."""
    from splitllama.results import _run_id, is_first_rank

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert is_first_rank()
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not is_first_rank()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_first_rank()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_first_rank()
    # torchrun: every rank names the same run directory
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f0c2a9b-aaaa")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _run_id.cache_clear()
    try:
        assert "/torchrun-3f0c2a9b-aaa" in _run_id()
    finally:
        _run_id.cache_clear()
