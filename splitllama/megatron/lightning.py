"""What the Lightning training stack needs to run ``backend=megatron``.

* :func:`build_megatron_split_model` builds the megatron split model (loaded from the donors or
  from a saved HF split model) and returns a :class:`MegatronSplitModel`, whose
  ``forward(input_ids, labels=None, position_ids=None, packed_seq_params=None)`` returns
  ``.loss`` (mean next-token loss, HF semantics) and ``.logits`` (``[b, s, vocab]``, gathered over
  tensor parallelism) like the HF model. Under pipeline parallelism use
  :meth:`MegatronSplitModel.forward_backward` (megatron's pipeline schedule) instead.
* :class:`MegatronStrategy`: a ``DDPStrategy`` that sets up megatron's TP/PP/DP groups from the
  trainer's processes, runs data parallelism over the DP group only, feeds each DP rank its own
  data shard (``distributed_sampler_kwargs``), sums sequence-parallel gradients over the TP group,
  clips by the global (TP-aware) gradient norm, and saves one checkpoint file per model-parallel rank.
* :func:`export_hf`: write an HF split checkpoint that ``AutoModelForCausalLM`` loads.
* :func:`build_megatron_backend` / :func:`register`: the ``SplitBackend`` the LightningModule uses
  (``splitllama.training.backends``), registered under the name ``megatron``.

Pipeline parallelism through Lightning's automatic optimisation is not supported (Lightning
drives one forward and one backward per batch; a pipeline needs the schedule's interleaving):
:meth:`MegatronSplitModel.forward_backward` runs it in a manual loop (see ``scripts/gpu_megatron.sh``).
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..configuration_split_llama import SplitLlamaConfig
from ._compat import require_megatron

require_megatron()

from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from .checkpoint_utils.custom_split_llama_loader import (  # noqa: E402
    load_hf_split_checkpoint,
    load_hf_weights_to_custom_split_llama,
)
from .checkpoint_utils.custom_split_llama_saver import export_hf_split_checkpoint  # noqa: E402
from .modeling_split_llama_megatron import (  # noqa: E402
    ParallelCustomSplitLLamaForCausalLM,
    ParallelCustomSplitLLamaForCausalLMRmPadPP,
    ParallelCustomSplitLLamaForValueRmPad,
    ParallelCustomSplitLLamaForValueRmPadPP,
    ParallelSplitLlama,
)
from .parallel import initialize_megatron_parallel, make_model_parallel_config  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

#: megatron parameter-name prefixes of the parts ``finetune.trainable`` names (as the HF backend's)
MEGATRON_PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "adapter": ("module.model.adapter.",),
    "first": ("module.model.layers_first.",),
    "last": ("module.model.layers_last.",),
    "embeddings": ("module.model.embed_tokens.",),
    "norm": ("module.model.norm.",),
    "head": ("module.lm_head.", "module.value_head."),
    "all": ("",),
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"params_dtype: unknown dtype {dtype!r} (float32, bfloat16 or float16)")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------ model
class MegatronSplitModel(nn.Module):
    """The megatron split model behind an HF-like ``forward``; ``module`` is the megatron model (this stage's)."""

    def __init__(self, module: ParallelSplitLlama, split_config: SplitLlamaConfig, params_dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.split_config = split_config
        self.params_dtype = params_dtype

    @property
    def config(self) -> SplitLlamaConfig:
        return self.split_config

    @property
    def layout(self) -> Any:
        return self.module.layout

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> Any:
        """``input_ids`` ``[b, s]`` (or ``[1, total]`` with ``packed_seq_params``) -> ``.loss``, ``.logits``.

        ``labels`` are shifted inside (position t predicts label t+1) and ``-100`` is ignored; with
        packed input the last token of each document predicts nothing. ``return_logits=False``
        skips gathering the vocabulary-parallel logits (training needs only the loss).
        """
        if self.module.layout.pp_size > 1:
            raise RuntimeError("under pipeline parallelism call forward_backward(batches): a stage cannot run alone")
        return self.module(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            packed_seq_params=packed_seq_params, gather_logits=return_logits,
        )

    def forward_backward(self, batches: Sequence[dict[str, torch.Tensor]], *, forward_only: bool = False) -> torch.Tensor | None:
        """One step's forward (and backward) over micro-batches; megatron's pipeline schedule when PP > 1.

        Each batch holds ``input_ids`` ``[b, s]`` and optionally ``labels`` (default: the input
        ids) and ``attention_mask``. Gradients accumulate in ``.grad`` (sum over micro-batches of
        loss / number of micro-batches). Returns the mean loss on the last pipeline stage, None on
        the others. Without pipeline parallelism this is a plain accumulation loop (megatron's
        no-pipelining schedule does the same but allocates on CUDA, so it cannot run on CPU).
        Under sequence parallelism the partial gradients of replicated parameters (norms, biases)
        are summed over the TP group at the end, so call it once per optimizer step.
        """
        loss = self._forward_backward(batches, forward_only=forward_only)
        if not forward_only:
            allreduce_sequence_parallel_grads(self.module)
        return loss

    def _forward_backward(self, batches: Sequence[dict[str, torch.Tensor]], *, forward_only: bool) -> torch.Tensor | None:
        if self.module.layout.pp_size == 1:
            losses = []
            for batch in batches:
                with torch.set_grad_enabled(not forward_only):
                    loss = self.module(
                        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                        labels=batch.get("labels", batch["input_ids"]), gather_logits=False,
                    ).loss
                if not forward_only:
                    (loss / len(batches)).backward()
                losses.append(loss.detach())
            return torch.stack(losses).mean()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Any]:
            batch = next(data_iterator)
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                labels=batch.get("labels", batch["input_ids"]), gather_logits=False,
            )
            if not model.layout.post_process:
                return out, None
            # a copy: the schedule divides the returned loss by the number of micro-batches in place
            return out.loss, lambda loss: (loss, {"loss": loss.detach().clone()})

        first = batches[0]["input_ids"]
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.module],
            num_microbatches=len(batches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )
        if not self.module.layout.post_process or not results:
            return None
        return torch.stack([r["loss"] for r in results]).mean()

    def export_hf(self, out_dir: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
        return export_hf_split_checkpoint([self.module], self.split_config, out_dir, dtype=dtype)


def build_megatron_split_model(
    split_config: SplitLlamaConfig | None = None,
    *,
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    params_dtype: torch.dtype | str = torch.float32,
    path8b: str | os.PathLike[str] | None = None,
    path70b: str | os.PathLike[str] | None = None,
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    adapter_init: str | None = None,
    hf_split_dir: str | os.PathLike[str] | None = None,
    value: bool = False,
    seed: int = 0,
    recompute: bool = False,
    random_init: bool = False,
) -> MegatronSplitModel:
    """Build the megatron split model for this process's TP/PP rank and load its weights.

    Weights come from ``hf_split_dir`` (a saved HF split model), or from the donors
    (``path8b``/``path70b``, default: the config's) plus ``adapter_checkpoint`` or ``adapter_init``
    (``random``/``identity``). ``random_init=True`` skips loading (benchmarks only: megatron's
    own random initialisation, logged). Sets up megatron's parallel groups if nobody has (a world
    of one process when not launched by torchrun or Lightning). ``recompute`` turns on full
    activation recomputation of every layer (GPU).
    """
    dtype = resolve_dtype(params_dtype)
    if split_config is None:
        if hf_split_dir is None:
            raise ValueError("split_config: give a SplitLlamaConfig, or hf_split_dir to read it from")
        split_config = SplitLlamaConfig.from_pretrained(os.fspath(hf_split_dir))
    if hf_split_dir is None and not random_init:
        path8b = path8b or split_config.path8b
        path70b = path70b or split_config.path70b
        if not path8b or not path70b:
            raise ValueError("path8b/path70b: donor directories (or hf_split_dir) are needed to load weights")
    initialize_megatron_parallel(tp, pp, seed=seed)
    megatron_config = make_model_parallel_config(tp=tp, pp=pp, sp=sp, params_dtype=dtype, perform_initialization=random_init)
    if recompute:
        megatron_config = _with_recompute(megatron_config)
    if pp > 1:
        cls = ParallelCustomSplitLLamaForValueRmPadPP if value else ParallelCustomSplitLLamaForCausalLMRmPadPP
    else:
        cls = ParallelCustomSplitLLamaForValueRmPad if value else ParallelCustomSplitLLamaForCausalLM
    module = cls(split_config, megatron_config)
    if random_init:
        logger.warning("megatron split model: random weights (random_init=True), nothing loaded")
    elif hf_split_dir is not None:
        load_hf_split_checkpoint(hf_split_dir, [module], split_config, dtype, is_value_model=value)
    else:
        load_hf_weights_to_custom_split_llama(
            path8b, path70b, adapter_checkpoint, [module], split_config, dtype, value, adapter_init=adapter_init, seed=seed
        )
    return MegatronSplitModel(module, split_config, dtype)


def _with_recompute(megatron_config: Any) -> Any:
    """Full recomputation of every layer (the donor TransformerConfigs copy these fields)."""
    megatron_config.recompute_granularity = "full"
    megatron_config.recompute_method = "uniform"
    megatron_config.recompute_num_layers = 1
    return megatron_config


def export_hf(model: MegatronSplitModel | nn.Module, out_dir: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (every rank calls this) as an HF split checkpoint; returns ``out_dir``."""
    while not isinstance(model, MegatronSplitModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, MegatronSplitModel):
        raise TypeError(f"export_hf: expected a MegatronSplitModel, got {type(model).__name__}")
    return model.export_hf(out_dir, dtype=dtype)


# ------------------------------------------------------------------------------------------ strategy
def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradient is partial per rank under sequence parallelism (norms, biases)."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum the partial gradients of sequence-parallel replicated parameters over the TP group."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def model_parallel_grad_norm(parameters: Sequence[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients over the model-parallel (TP x PP) group, each element counted once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total: torch.Tensor | None = None
    for p in parameters:
        if p.grad is None:
            continue
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue  # replicated over TP: rank 0 counts it
        sq = p.grad.detach().float().pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        device = next((p.device for p in parameters), torch.device("cpu"))
        total = torch.zeros((), device=device)
    if parallel_state.get_model_parallel_group() is not None and dist.get_world_size(parallel_state.get_model_parallel_group()) > 1:
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


def clip_grad_norm_model_parallel(parameters: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` with the norm taken over the whole model, not this rank's shards."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = model_parallel_grad_norm(parameters)
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in parameters:
            p.grad.mul_(coef)
    return norm


class MegatronStrategy(DDPStrategy):
    """Lightning strategy for the megatron backend: TP/PP groups from the trainer's processes, DP over the DP group.

    Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel: megatron's sizes;
            the data-parallel size is the number of processes / (TP x PP).
        **ddp_kwargs: passed to ``DistributedDataParallel`` (the process group is set here).
    """

    strategy_name = "megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        sequence_parallel: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        if pipeline_model_parallel_size > 1:
            raise ValueError(
                "parallel.pp: pipeline parallelism is not available through Lightning's automatic optimisation; "
                "use MegatronSplitModel.forward_backward in a manual loop"
            )
        if sequence_parallel and tensor_model_parallel_size < 2:
            raise ValueError("parallel.sp: sequence parallelism needs tensor parallel size >= 2")
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
        self._ddp_kwargs["process_group"] = parallel_state.get_data_parallel_group()

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
        super().setup(trainer)

        def clip_grad_by_norm(precision: Any, optimizer: Any, clip_val: float) -> None:
            clip_grad_norm_model_parallel(list(precision.main_params(optimizer)), float(clip_val))

        # Lightning clips this rank's gradients by this rank's norm; with TP that differs per rank.
        self.precision_plugin.clip_grad_by_norm = types.MethodType(clip_grad_by_norm, self.precision_plugin)

    # ---------------------------------------------------------------- steps
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()
            if self.sequence_parallel:  # once per optimizer step, after the last micro-batch's backward
                allreduce_sequence_parallel_grads(self.lightning_module)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

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


# ------------------------------------------------------------------------------------------ backend
class MegatronBackend:
    """The ``SplitBackend`` of ``splitllama.training``: the megatron split model behind the same methods as ``hf``.

    ``options``: ``tp``, ``pp``, ``sp`` (parallel sizes; ``parallel/*.yaml``), ``recompute``.
    """

    name = "megatron"

    def __init__(self, spec: Any, options: dict[str, Any]) -> None:
        self.spec = spec
        self.config: SplitLlamaConfig = spec.split_config()
        if getattr(spec, "adapter_init", None) == "lstsq":
            raise ValueError(
                "adapter.init=lstsq: not available with backend=megatron; fit it once with backend=hf and pass "
                "adapter.checkpoint, or use random/identity"
            )
        tp, pp = int(options.get("tp", 1)), int(options.get("pp", 1))
        if parallel_state.model_parallel_is_initialized():  # MegatronStrategy set the sizes
            tp = parallel_state.get_tensor_model_parallel_world_size()
            pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.model = build_megatron_split_model(
            self.config, tp=tp, pp=pp, sp=bool(options.get("sp", False)), params_dtype=spec.dtype,
            path8b=spec.path8b, path70b=spec.path70b, adapter_checkpoint=spec.adapter_checkpoint,
            adapter_init=spec.adapter_init, hf_split_dir=spec.model_dir, seed=spec.seed,
            recompute=bool(options.get("recompute", options.get("gradient_checkpointing", False))),
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def select_trainable(self, parts: Sequence[str], lora: dict[str, Any] | None) -> list[str]:
        if lora and lora.get("enabled", True):
            raise ValueError("finetune.lora: LoRA is not implemented for backend=megatron (use backend=hf)")
        unknown = [p for p in parts if p not in MEGATRON_PART_PREFIXES]
        if unknown:
            raise ValueError(f"finetune.trainable: unknown parts {unknown}; choose from {sorted(MEGATRON_PART_PREFIXES)}")
        prefixes = tuple(prefix for part in parts for prefix in MEGATRON_PART_PREFIXES[part])
        trainable = []
        for name, param in self.model.named_parameters():
            want = bool(prefixes) and name.startswith(prefixes)
            param.requires_grad_(want)
            if want:
                trainable.append(name)
        if not trainable:
            raise ValueError(f"finetune.trainable={list(parts)}: no parameter matches (the {self.config.adapter} adapter has none?)")
        return trainable

    def export_hf(self, out_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
        out = export_hf(self.model, out_dir)
        if tokenizer is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            tokenizer.save_pretrained(out)
        return out


def build_megatron_backend(spec: Any, options: dict[str, Any]) -> MegatronBackend:
    return MegatronBackend(spec, options)


def register() -> None:
    """Make ``backend.name=megatron`` available to ``splitllama.training``."""
    from ..training.backends import register_backend

    register_backend("megatron", build_megatron_backend)


__all__ = [
    "MEGATRON_PART_PREFIXES",
    "MegatronBackend",
    "MegatronSplitModel",
    "MegatronStrategy",
    "allreduce_sequence_parallel_grads",
    "build_megatron_backend",
    "build_megatron_split_model",
    "clip_grad_norm_model_parallel",
    "export_hf",
    "model_parallel_grad_norm",
    "register",
]
