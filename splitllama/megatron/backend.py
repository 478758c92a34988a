"""The megatron-core backend as one object: its settings, checks, strategy and model, chosen by
``conf/backend/megatron.yaml`` (``_target_: splitllama.megatron.backend.MegatronBackendSpec``).

Importing this module does not import megatron-core: the run config is checked (parallel sizes,
what megatron does not implement) before any process starts or weights are read; the model
(:mod:`splitllama.megatron.model`) and the strategy (:mod:`splitllama.megatron.strategy`) are
imported when built, and name the extra to install where megatron-core is absent.
"""

from __future__ import annotations

import os
from typing import Any

from ..backend.spec import BackendSpec
from ..errors import RunConfigError, check_setting
from .checkpoint_utils.layout import MEGATRON_PART_PREFIXES



def _task_name(cfg: Any) -> str:
    name = cfg.task.name
    return getattr(name, "name", name)


class MegatronBackendSpec(BackendSpec):
    """``backend=megatron``: TP/PP/SP shards built per rank, trained through megatron's schedule.

    Its parallel sizes are its own fields, ``backend.tp``, ``backend.pp``, ``backend.sp`` and
    ``backend.micro_batch_size`` (``conf/backend/megatron.yaml``); the megatron files of ``parallel``
    (``tp2``, ``tp2_sp``, ``pp2``, ``tp2_dp2``, ``tp2_pp2``) set them together with the device count.
    """

    part_prefixes = MEGATRON_PART_PREFIXES
    builds_per_rank = True
    runs_own_schedule = True
    shards_with_fsdp = False

    def validate(self, cfg: Any) -> None:
        par, tp, pp = cfg.parallel, self.tp, self.pp
        check_setting(par.strategy in ("auto", "ddp", "megatron"), "parallel.strategy", par.strategy,
               "backend=megatron runs its own strategy (data parallel over megatron's DP group); use parallel=single, ddp or a "
               "megatron file (tp2, tp2_sp, pp2, tp2_pp2)")
        check_setting(not self.sp or tp >= 2, "backend.sp", self.sp, "sequence parallelism needs backend.tp >= 2")
        if self.micro_batch_size is not None:
            check_setting(self.micro_batch_size >= 1 and cfg.data.batch_size % self.micro_batch_size == 0, "backend.micro_batch_size",
                   self.micro_batch_size, f"must be >= 1 and divide data.batch_size={cfg.data.batch_size}")
        check_setting(cfg.trainer.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches,
               "must be 1 with backend=megatron: megatron's schedule accumulates micro-batches within a batch "
               "(raise data.batch_size and set backend.micro_batch_size)")
        check_setting(_task_name(cfg) != "assemble" or tp * pp == 1, "task.name", "assemble",
               f"runs in one process; with backend=megatron use backend.tp=1 backend.pp=1 (got tp={tp}, pp={pp}): "
               "the saved HF checkpoint is the same")
        if isinstance(par.devices, int):
            mp, world = tp * pp, par.devices * par.num_nodes
            check_setting(world % mp == 0, "parallel.devices", par.devices,
                   f"x parallel.num_nodes={par.num_nodes} (= {world} processes) must be a multiple of backend.tp x backend.pp = {mp}")
        if cfg.finetune.lora.enabled:
            raise RunConfigError("finetune.lora: LoRA is not implemented for backend=megatron (use backend=hf)")
        init = cfg.adapter.init
        if getattr(init, "name", init) == "lstsq" and cfg.adapter.checkpoint is None and getattr(cfg.adapter.kind, "name", None) != "identity":
            raise RunConfigError(
                "adapter.init=lstsq: not available with backend=megatron; fit it once with backend=hf and pass "
                "adapter.checkpoint, or use random/identity"
            )

    def check_split(self, split: Any, cfg: Any) -> None:
        """``backend.tp`` must divide both donors' query and KV heads (megatron shards whole heads)."""
        for donor, config in (("small", split.config_8b), ("large", split.config_70b)):
            heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
            if heads % self.tp or kv % self.tp:
                raise RunConfigError(
                    f"backend.tp={self.tp}: must divide the {donor} donor's {heads} attention heads and {kv} KV heads"
                )

    def strategy(self, cfg: Any, timeout: dict[str, Any]) -> Any:
        """:class:`~splitllama.megatron.strategy.MegatronStrategy` whatever ``parallel.strategy`` says
        (megatron's TP/PP/DP groups from the trainer's processes, DDP over the DP group only)."""
        from .strategy import MegatronStrategy

        if self.tp > 1:
            # megatron's tensor-parallel linears overlap their input-gradient all-reduce (reduce-scatter under SP)
            # with the weight-gradient product only when kernels reach the GPU in launch order; megatron's own
            # launchers set this too. Read when CUDA starts, so it is set here, before the trainer's processes
            # start; a value the user set is kept.
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        return MegatronStrategy(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp, sequence_parallel=self.sp, **timeout,
        )

    def build(self, spec: Any, options: dict[str, Any]) -> Any:
        try:
            from .model import MegatronBackend
        except ImportError as exc:
            raise ImportError(
                f"backend=megatron needs megatron-core: pip install -e .[megatron] (0.16 on Python 3.11, 0.19 on 3.12); {exc}"
            ) from exc
        return MegatronBackend(spec, {**options, "tp": self.tp, "pp": self.pp, "sp": self.sp})


def build_megatron_backend(spec: Any, options: dict[str, Any]) -> Any:
    """The megatron ``SplitBackend`` for ``spec`` (``options``: ``tp``, ``pp``, ``sp``, ``recompute``)."""
    sizes = {key: options[key] for key in ("tp", "pp", "sp") if key in options}
    return MegatronBackendSpec("megatron", **sizes).build(spec, options)


__all__ = ["MEGATRON_PART_PREFIXES", "MegatronBackendSpec", "build_megatron_backend"]
