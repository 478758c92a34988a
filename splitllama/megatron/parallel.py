"""Megatron's parallel state (TP/PP/DP groups) and the ``ModelParallelConfig`` of a split model.

Works on GPU (NCCL) and on CPU (gloo): on CPU the tensor-parallel forward runs, and the
backward at TP=1 (megatron-core's backward collectives at TP>1 allocate on CUDA).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from ._compat import require_megatron

require_megatron()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402

from .layers.spec import dtype_flags  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_megatron_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    backend: str | None = None,
    seed: int | None = 0,
    timeout_minutes: int = 30,
) -> None:
    """Set up megatron's TP/PP/DP process groups over the current ``torch.distributed`` world.

    Starts a world of one process (gloo on CPU, NCCL on GPU) when none is running, so a single
    process can use the backend without a launcher. Data parallel size is
    ``world / (tp * pp)``; ranks of one tensor-parallel group are adjacent (megatron's order).
    """
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(minutes=timeout_minutes))
        else:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline parallel size {tp} x {pp}")
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=timeout_minutes
    )
    if seed is not None:
        seed_megatron(seed)


def seed_megatron(seed: int) -> None:
    """Seed torch and, on GPU, megatron's tensor-parallel RNG tracker (needed for its dropout regions)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def communication_device(group: Any = None) -> torch.device:
    """Where a tensor sent through a collective over ``group`` must live: this rank's GPU under NCCL,
    else the CPU. Lightning moves the model back to the CPU when ``fit`` ends, so collectives
    after it (parameter counts, the export's gathers) move their tensors here first."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_megatron_parallel(destroy_process_group: bool = False) -> None:
    """Tear down megatron's groups (and the ``torch.distributed`` world if asked)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def make_model_parallel_config(
    *,
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    perform_initialization: bool = True,
    **overrides: Any,
) -> ModelParallelConfig:
    """The ``megatron_config`` the model classes take: parallel sizes, dtype, where to initialise.

    ``variable_seq_lengths`` is on under pipeline parallelism: stages before the adapter send
    ``h_s``-wide activations and later ones ``h_l``-wide, so stages exchange shapes first.
    """
    if sp and tp < 2:
        raise ValueError("sequence parallelism (sp) needs tensor parallel size >= 2")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        pipeline_dtype=params_dtype if pp > 1 else None,
        variable_seq_lengths=pp > 1,
        **dtype_flags(params_dtype),
        **overrides,
    )


__all__ = ["destroy_megatron_parallel", "initialize_megatron_parallel", "make_model_parallel_config", "seed_megatron"]
