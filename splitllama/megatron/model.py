"""The megatron split model for one rank, behind an HF-like ``forward``, and the backend that trains it.

* :func:`build_megatron_split_model` builds the megatron split model (loaded from the donors or
  from a saved HF split model) and returns a :class:`MegatronSplitModel`, whose
  ``forward(input_ids, labels=None, position_ids=None, packed_seq_params=None)`` returns
  ``.loss`` (mean next-token loss, HF semantics) and ``.logits`` (``[b, s, vocab]``, gathered over
  tensor parallelism) like the HF model. Training steps go through
  :meth:`MegatronSplitModel.run_schedule` (megatron's forward-backward schedule; pipelined under PP),
  which finishes the gradients itself (:mod:`splitllama.megatron.grads`).
* :func:`export_hf`: write an HF split checkpoint that ``AutoModelForCausalLM`` loads.
* :class:`MegatronBackend`: the ``SplitBackend`` the LightningModule uses (``splitllama.backend.hf``),
  built by :class:`splitllama.megatron.backend.MegatronBackendSpec`.

Why manual optimisation: Lightning's automatic loop runs one forward and one backward per batch,
but a pipeline interleaves the forwards and backwards of many micro-batches across stages, and
only megatron's schedule knows that order. The same path serves TP-only and DP runs, so every
megatron run trains through one code path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import check_model_dir
from ..configuration_split_llama import SplitLlamaConfig
from ..dtypes import resolve_dtype
from ..errors import RunConfigError
from ._compat import require_megatron

require_megatron()

from megatron.core import parallel_state  # noqa: E402

from .checkpoint_utils.layout import MEGATRON_PART_PREFIXES  # noqa: E402
from .checkpoint_utils.custom_split_llama_loader import (  # noqa: E402
    load_hf_split_checkpoint,
    load_hf_weights_to_custom_split_llama,
)
from .checkpoint_utils.custom_split_llama_saver import export_hf_split_checkpoint  # noqa: E402
from .grads import (  # noqa: E402
    allreduce_data_parallel_grads,
    allreduce_sequence_parallel_grads,
    clip_grad_norm_model_parallel,
    model_parallel_grad_norm,
)
from .modeling_split_llama_megatron import (  # noqa: E402
    ParallelCustomSplitLLamaForCausalLM,
    ParallelCustomSplitLLamaForCausalLMRmPadPP,
    ParallelCustomSplitLLamaForValueRmPad,
    ParallelCustomSplitLLamaForValueRmPadPP,
    ParallelSplitLlama,
)
from .parallel import communication_device, initialize_megatron_parallel, make_model_parallel_config  # noqa: E402

logger = logging.getLogger(__name__)


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

    def forward_backward(self, batches: Sequence[dict[str, torch.Tensor]], *, forward_only: bool = False) -> torch.Tensor:
        """One step's forward (and backward) over micro-batches; megatron's pipeline schedule when PP > 1.

        Each batch holds ``input_ids`` ``[b, s]`` and optionally ``labels`` (default: the input
        ids) and ``attention_mask``. Gradients accumulate in ``.grad`` (sum over micro-batches of
        loss / number of micro-batches) and are finished (see :meth:`run_schedule`), so call it
        once per optimizer step. Returns the mean next-token loss on every rank.
        """
        return self.run_schedule(batches, forward_only=forward_only)["loss"]

    def run_schedule(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        *,
        loss_fn: LossFn | None = None,
        parts: Sequence[str] = ("loss",),
        forward_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Forward (and backward) of one optimizer step's micro-batches; returns the mean of each loss part.

        ``loss_fn(logits, batch) -> {"loss": ..., <other parts>}`` computes the loss from the
        full-vocabulary logits ``[b, s, vocab]`` (gathered over TP) on the last stage, for
        objectives that need logits (distillation). Without it the model's vocab-parallel
        next-token loss is used and the logits are never gathered. ``parts`` names the entries
        returned (``"loss"`` is what is differentiated). The means are broadcast from the last
        pipeline stage, so every rank returns them.

        After the backward the gradients are finished: sequence-parallel partial gradients of
        replicated parameters (norms) are summed over the TP group, and every gradient is
        averaged over the data-parallel group (what torch's DDP would do; the model is not
        wrapped in it because a pipeline step runs many backwards).
        """
        means = self._run_schedule(batches, loss_fn, forward_only)
        if not forward_only:
            allreduce_sequence_parallel_grads(self.module)
            allreduce_data_parallel_grads(self.module)
        return broadcast_from_last_stage(means, parts, device=batches[0]["input_ids"].device)

    def _forward_step(self, model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn | None) -> tuple[Any, Any]:
        """One micro-batch: the stage's output, and (last stage) the loss with its parts."""
        if loss_fn is None:
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                labels=batch.get("labels", batch["input_ids"]), gather_logits=False,
            )
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), gather_logits=True)
        if not model.layout.post_process:
            return out, None
        parts = {"loss": out.loss} if loss_fn is None else dict(loss_fn(out.logits, batch))
        return parts["loss"], parts

    def _run_schedule(
        self, batches: Sequence[dict[str, torch.Tensor]], loss_fn: LossFn | None, forward_only: bool
    ) -> dict[str, torch.Tensor] | None:
        if not batches:
            raise ValueError("run_schedule: no micro-batches")
        if self.module.layout.pp_size == 1:
            # megatron's no-pipelining schedule does the same but allocates on CUDA (no CPU runs)
            collected: list[dict[str, torch.Tensor]] = []
            for batch in batches:
                with torch.set_grad_enabled(not forward_only):
                    loss, parts = self._forward_step(self.module, batch, loss_fn)
                if not forward_only:
                    (loss / len(batches)).backward()
                collected.append({k: v.detach() for k, v in parts.items()})
            return _mean_parts(collected)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Any]:
            output, parts = self._forward_step(model, next(data_iterator), loss_fn)
            if parts is None:
                return output, None
            # copies: the schedule divides the returned loss by the number of micro-batches in place
            return output, lambda loss: (loss, {k: v.detach().clone() for k, v in parts.items()})

        first = batches[0]["input_ids"]
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.module],
            num_microbatches=len(batches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )
        if not self.module.layout.post_process or not results:
            return None
        return _mean_parts(results)

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
    dtype = resolve_dtype(params_dtype, "params_dtype", (torch.float32, torch.bfloat16, torch.float16))
    if hf_split_dir is not None and not random_init:  # its files whole, before any process group or weight
        check_model_dir(hf_split_dir, f"hf_split_dir={hf_split_dir}", model_types=(SplitLlamaConfig.model_type,),
                        fix="Export the split model again, or give another hf_split_dir")
    if split_config is None:
        if hf_split_dir is None:
            raise ValueError("split_config: give a SplitLlamaConfig, or hf_split_dir to read it from")
        split_config = SplitLlamaConfig.from_pretrained(os.fspath(hf_split_dir))
    if hf_split_dir is None and not random_init:
        path8b = path8b or split_config.path8b
        path70b = path70b or split_config.path70b
        if not path8b or not path70b:
            raise ValueError("path8b/path70b: donor directories (or hf_split_dir) are needed to load weights")
        for key, donor in (("path8b", path8b), ("path70b", path70b)):  # both donors' files, before either is read
            check_model_dir(donor, f"{key}={donor}", fix=f"Download or copy that checkpoint again, or give another {key}")
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


LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _mean_parts(collected: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([c[key].float() for c in collected]).mean() for key in collected[0]}


def broadcast_from_last_stage(
    means: dict[str, torch.Tensor] | None, parts: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The loss parts of the last pipeline stage on every stage (a no-op without pipeline parallelism)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        if means is None:
            raise RuntimeError("run_schedule: the last stage computed no loss")
        return {key: means[key] for key in parts}
    values = torch.zeros(len(parts), device=device, dtype=torch.float32)
    if means is not None:
        missing = [key for key in parts if key not in means]
        if missing:
            raise KeyError(f"run_schedule: loss_fn returned {sorted(means)}, not {missing}")
        values = torch.stack([means[key].float().to(device) for key in parts])
    dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(parts, values.unbind(0)))

class MegatronBackend:
    """The ``SplitBackend`` of ``splitllama.training``: the megatron split model behind the same methods as ``hf``.

    ``options``: ``tp``, ``pp``, ``sp`` (parallel sizes: the backend's ``backend.tp`` / ``pp`` / ``sp``), ``recompute``.
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

    #: trains through :meth:`run_schedule` (the LightningModule switches to manual optimisation)
    manual_schedule = True
    #: :meth:`export_hf` gathers the TP/PP shards: every rank calls it, rank 0 writes
    collective_export = True

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def run_schedule(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        *,
        loss_fn: LossFn | None = None,
        parts: Sequence[str] = ("loss",),
        forward_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """See :meth:`MegatronSplitModel.run_schedule`."""
        return self.model.run_schedule(batches, loss_fn=loss_fn, parts=parts, forward_only=forward_only)

    def clip_grad_norm(self, parameters: Sequence[nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """The gradient norm over all model-parallel shards; clipped to ``max_norm`` unless it is None."""
        device = next(self.model.parameters()).device
        if max_norm is None:
            return model_parallel_grad_norm([p for p in parameters if p.grad is not None], device)
        return clip_grad_norm_model_parallel(parameters, max_norm, device)

    def parameter_counts(self) -> dict[str, int]:
        """Whole-model counts (every model-parallel rank calls it): TP shards summed, replicated tensors once, stages summed."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        total = trainable = 0
        for param in self.model.parameters():
            if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
                total += param.numel()
                trainable += param.numel() if param.requires_grad else 0
        group = parallel_state.get_model_parallel_group()
        counts = torch.tensor([total, trainable], dtype=torch.long, device=communication_device(group))
        if dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        return {"total": int(counts[0]), "trainable": int(counts[1])}

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
        found = torch.tensor([len(trainable)], dtype=torch.long)
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # a pipeline stage may hold none of the chosen parts (the adapter lives on one stage)
            group = parallel_state.get_pipeline_model_parallel_group()
            found = found.to(communication_device(group))
            dist.all_reduce(found, group=group)
        if int(found.item()) == 0:
            raise RunConfigError(f"finetune.trainable={list(parts)}: no parameter of the split model is in these parts (the "
                                 f"{self.config.adapter} adapter has no weights?); list parts that hold weights, e.g. "
                                 "finetune.trainable=[last] or finetune=all, or enable LoRA (finetune=lora)")
        return trainable

    def export_hf(self, out_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
        out = export_hf(self.model, out_dir)
        if tokenizer is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            tokenizer.save_pretrained(out)
        return out

__all__ = [
    "LossFn",
    "MegatronBackend",
    "MegatronSplitModel",
    "broadcast_from_last_stage",
    "build_megatron_split_model",
    "export_hf",
]
