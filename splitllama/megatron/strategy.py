"""The megatron backend's Lightning strategy (a file of its own, as NeMo keeps ``MegatronStrategy``).

:class:`MegatronStrategy` is a ``DDPStrategy`` that sets up megatron's TP/PP/DP groups from the
trainer's processes, feeds each DP rank its own data shard (``distributed_sampler_kwargs``) and
saves one checkpoint file per model-parallel rank. It does not wrap the model in torch's DDP: the
LightningModule trains the megatron backend with manual optimisation through
:meth:`~splitllama.megatron.model.MegatronSplitModel.run_schedule`, which finishes the gradients
itself (:mod:`splitllama.megatron.grads`).
"""

from __future__ import annotations

from typing import Any

from ._compat import require_megatron

require_megatron()

from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from .grads import broadcast_trainable_params  # noqa: E402
from .parallel import initialize_megatron_parallel  # noqa: E402


class MegatronStrategy(DDPStrategy):
    """Lightning strategy for the megatron backend: TP/PP/DP groups from the trainer's processes.

    Use it with a LightningModule that trains through :meth:`MegatronSplitModel.run_schedule`
    (manual optimisation; ``splitllama.training.SplitLlamaLitModule`` does): the schedule
    finishes the gradients (SP sums over TP, averages over DP), and gradient clipping must use
    :func:`clip_grad_norm_model_parallel` (the norm over all shards), not the Trainer's.

    Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel: megatron's sizes;
            the data-parallel size is the number of processes / (TP x PP).
        **ddp_kwargs: ``DDPStrategy`` arguments (process-group backend, timeout, ...).
    """

    strategy_name = "megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        sequence_parallel: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        if sequence_parallel and tensor_model_parallel_size < 2:
            raise ValueError("backend.sp: sequence parallelism needs tensor parallel size >= 2")
        ddp_kwargs.setdefault("find_unused_parameters", False)
        super().__init__(**ddp_kwargs)
        self.tensor_model_parallel_size = int(tensor_model_parallel_size)
        self.pipeline_model_parallel_size = int(pipeline_model_parallel_size)
        self.sequence_parallel = bool(sequence_parallel)

    # ---------------------------------------------------------------- groups
    def setup_distributed(self) -> None:
        super().setup_distributed()
        world = self.world_size
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world % mp:
            raise ValueError(f"parallel: {world} processes are not divisible by tp x pp = {mp}")
        initialize_megatron_parallel(self.tensor_model_parallel_size, self.pipeline_model_parallel_size)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Data shards by data-parallel rank: the ranks of one TP/PP group see the same batches."""
        if not parallel_state.model_parallel_is_initialized():
            return super().distributed_sampler_kwargs
        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    def setup(self, trainer: Any) -> None:
        """Outside fitting, ``DDPStrategy.setup`` broadcasts every module state from global rank 0 over
        the whole world (``_sync_module_states``), which would overwrite the other tensor-parallel
        ranks' shards with rank 0's (a wrong model at TP > 1) and, under pipeline parallelism, meet
        tensors of another stage's shapes (a collective mismatch that hangs). Only data-parallel
        replicas share weights, so only they are synchronised (as :meth:`configure_ddp` does)."""
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn == TrainerFn.FITTING:
            return super().setup(trainer)
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        broadcast_trainable_params(self.model)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        """No torch DDP wrapper: :meth:`MegatronSplitModel.run_schedule` averages gradients over the DP group.

        A pipeline step runs one backward per micro-batch, which torch's DDP reducer does not
        allow within one forward; so replicas start equal here (DP rank 0's trainable weights)
        and the schedule finishes the gradients.
        """
        broadcast_trainable_params(self.model)

    # ---------------------------------------------------------------- checkpoints (one file per model-parallel rank)
    def _rank_file(self, filepath: Any) -> str:
        tp = parallel_state.get_tensor_model_parallel_rank()
        pp = parallel_state.get_pipeline_model_parallel_rank()
        return str(filepath) if tp == 0 and pp == 0 else f"{filepath}.mp_rank_{tp:02d}_{pp:03d}"

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.model_parallel_size == 1:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if parallel_state.get_data_parallel_rank() == 0:
            self.checkpoint_io.save_checkpoint(checkpoint, self._rank_file(filepath), storage_options=storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.model_parallel_size == 1:
            return super().remove_checkpoint(filepath)
        if parallel_state.get_data_parallel_rank() == 0:
            self.checkpoint_io.remove_checkpoint(self._rank_file(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = checkpoint_path if self.model_parallel_size == 1 else self._rank_file(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

__all__ = ["MegatronStrategy"]
