"""The split LLaMA model from megatron-core parts, tensor and pipeline parallel.

::

    input_ids -> VocabParallelEmbedding (small donor)
              -> TransformerBlock "layers_first" (small donor's TransformerConfig)
              -> ParallelSplitAdapter h_s -> h_l
              -> TransformerBlock "layers_last" (large donor's TransformerConfig)
              -> RMSNorm -> ColumnParallelLinear lm_head (or a value head)

Inside, activations use megatron's ``[seq, batch, hidden]`` layout (``[seq/tp, batch, hidden]``
under sequence parallelism); the public forwards take and return batch-first tensors like the HF
backend. All model classes are one implementation, :class:`ParallelSplitLlama`, with three switches:
the head (none, LM, value), packed input ("remove padding": the documents of a padded batch are
packed into one row and attend only within themselves), and the pipeline stage it is (which
layers it holds; :class:`SplitStageLayout`). The seed's class names are thin subclasses.

Module (and parameter) names mirror the HF backend where the layout allows:
``model.embed_tokens``, ``model.layers_first.layers.{i}``, ``model.adapter.adapter_linear_{1,2}``,
``model.layers_last.layers.{j}``, ``model.norm``, ``lm_head`` / ``value_head``. Decoder layers are
megatron ``TransformerLayer``s: fused ``self_attention.linear_qkv`` and ``mlp.linear_fc1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import require_megatron

require_megatron()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast  # noqa: E402

from ..configuration_split_llama import SplitLlamaConfig  # noqa: E402
from ..modeling_split_llama import SplitLlamaValueOutput  # noqa: E402
from .layers.adapter import ParallelSplitAdapter  # noqa: E402
from .layers.comm import gather_last_dim_from_tensor_parallel  # noqa: E402
from .layers.norm import LlamaRMSNormTP  # noqa: E402
from .layers.rotary import LlamaRotaryAngles  # noqa: E402
from .layers.spec import donor_transformer_config, llama_layer_spec  # noqa: E402

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class SplitStageLayout:
    """Which part of the split model one pipeline stage holds.

    The ``N + M`` decoder layers (small donor's first, then the large donor's) are cut into
    ``pp_size`` contiguous runs, the earlier stages taking one extra layer when the count does
    not divide. The adapter sits on the stage holding the last small-donor layer (stage 0 when
    there is none), so a stage's output is ``h_s`` wide before the adapter and ``h_l`` after it.
    """

    pp_rank: int
    pp_size: int
    first: range  #: indices into ``layers_first`` (small-donor layers) on this stage
    last: range  #: indices into ``layers_last`` (large-donor layers) on this stage
    has_adapter: bool
    pre_process: bool  #: holds the embeddings
    post_process: bool  #: holds the final norm and head

    @classmethod
    def for_stage(cls, config: SplitLlamaConfig, pp_rank: int = 0, pp_size: int = 1) -> SplitStageLayout:
        n, m = config.num_layers_8, config.num_layers_70
        total = n + m
        if pp_size < 1 or not 0 <= pp_rank < pp_size:
            raise ValueError(f"pipeline rank {pp_rank} outside 0..{pp_size - 1}")
        if total < pp_size:
            raise ValueError(
                f"pipeline parallel size {pp_size} exceeds the split model's {total} layers "
                f"(num_layers_8={n} + num_layers_70={m}); every stage needs a layer"
            )
        base, extra = divmod(total, pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        stop = start + base + (1 if pp_rank < extra else 0)
        first = range(min(start, n), min(stop, n))
        last = range(max(start - n, 0), max(stop - n, 0))
        has_adapter = (n > 0 and start <= n - 1 < stop) or (n == 0 and pp_rank == 0)
        return cls(pp_rank, pp_size, first, last, has_adapter, pp_rank == 0, pp_rank == pp_size - 1)

    def input_width(self, config: SplitLlamaConfig) -> int:
        """Hidden size this stage receives from the previous one."""
        return config.hidden_size_8 if (len(self.first) or self.has_adapter) else config.hidden_size_70

    def output_width(self, config: SplitLlamaConfig) -> int:
        """Hidden size this stage sends to the next one."""
        return config.hidden_size_70 if (self.has_adapter or len(self.last)) else config.hidden_size_8


# ------------------------------------------------------------------------------------------ packing
@dataclass
class PackedBatch:
    """Documents of a padded batch packed into one row (``[1, total]``), and how to unpack them."""

    input_ids: torch.Tensor  #: ``[1, total]``
    position_ids: torch.Tensor  #: ``[1, total]``, restarting at 0 in every document
    cu_seqlens: torch.Tensor  #: ``[docs + 1]`` int32 cumulative lengths (a padding run may end it)
    max_seqlen: int
    indices: torch.Tensor  #: positions of the real tokens in the flattened ``[batch * seq]`` input
    batch: int
    seq: int
    real_tokens: int  #: tokens before any padding added for sequence parallelism

    def packed_seq_params(self) -> PackedSeqParams:
        """Megatron's packed-sequence parameters for our core attention (``[s, b=1, ...]`` activations)."""
        return make_packed_seq_params(self.cu_seqlens, self.max_seqlen)

    def unpack(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[1, total, ...]`` per-token outputs -> ``[batch, seq, ...]`` with ``fill`` at padding."""
        values = packed[0, : self.real_tokens]
        out = values.new_full((self.batch * self.seq, *values.shape[1:]), fill)
        out[self.indices] = values
        return out.view(self.batch, self.seq, *values.shape[1:])


def make_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """``PackedSeqParams`` in the ``sbhd`` layout our attention reads (rotary is applied per token by us)."""
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen)
    )


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``[total]`` positions restarting at 0 at every document start."""
    cu = cu_seqlens.to(device=device or cu_seqlens.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(int(cu[-1]), device=cu.device) - starts


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_to_multiple: int = 1) -> PackedBatch:
    """Pack the real tokens (``attention_mask == 1``) of each row into one row, left- or right-padded input alike.

    ``pad_to_multiple`` pads the packed row (with a final dummy document) so sequence
    parallelism can split it evenly.
    """
    batch, seq = input_ids.shape
    if attention_mask is None:
        return _pack_full_rows(input_ids, pad_to_multiple)
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    indices = mask.reshape(-1).nonzero(as_tuple=False).squeeze(1)
    ids = input_ids.reshape(-1)[indices]
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = torch.cumsum(lengths, 0)
    keep = torch.cat([cu[:1], cu[1:][lengths > 0]])  # drop empty rows
    real = int(ids.numel())
    padded = -(-real // pad_to_multiple) * pad_to_multiple if real else pad_to_multiple
    if padded > real:
        ids = torch.cat([ids, ids.new_zeros(padded - real)])
        keep = torch.cat([keep, keep.new_tensor([padded])])
    positions = positions_from_cu_seqlens(keep)
    max_len = int((keep[1:] - keep[:-1]).max()) if keep.numel() > 1 else 0
    return PackedBatch(ids[None], positions[None], keep, max_len, indices, batch, seq, real)


def _pack_full_rows(input_ids: torch.Tensor, pad_to_multiple: int) -> PackedBatch:
    """:func:`pack_sequences` of rows without padding, from the shapes alone: no value is read back from the
    device, so the host keeps queueing work (each read-back, as the masked path's ``nonzero``, waits for the
    GPU; a pipeline stage packs every micro-batch)."""
    batch, seq = input_ids.shape
    device = input_ids.device
    real = batch * seq
    padded = -(-real // pad_to_multiple) * pad_to_multiple
    ids = input_ids.reshape(-1)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq
    positions = torch.arange(seq, device=device).repeat(batch)
    if padded > real:  # a final dummy document up to the multiple
        ids = torch.cat([ids, ids.new_zeros(padded - real)])
        starts = torch.cat([starts, torch.full((1,), padded, dtype=torch.int32, device=device)])
        positions = torch.cat([positions, torch.arange(padded - real, device=device)])
    indices = torch.arange(real, device=device)
    return PackedBatch(ids[None], positions[None], starts, max(seq, padded - real), indices, batch, seq, real)


def attention_mask_is_trivial(attention_mask: torch.Tensor | None) -> bool:
    return attention_mask is None or bool(attention_mask.to(torch.bool).all())


# ------------------------------------------------------------------------------------------ model
def _normal_init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(weight, mean=0.0, std=std)

    return init


class ParallelSplitLlamaBody(nn.Module):
    """Embeddings, the small donor's block, adapter, the large donor's block and final norm of one stage."""

    def __init__(self, config: SplitLlamaConfig, megatron_config: ModelParallelConfig, layout: SplitStageLayout) -> None:
        super().__init__()
        self.split_config = config
        self.layout = layout
        small, large = config.config_8b, config.config_70b
        self.config_small = donor_transformer_config(small, megatron_config, len(layout.first), "config_8b")
        self.config_large = donor_transformer_config(large, megatron_config, len(layout.last), "config_70b")
        self.sequence_parallel = bool(self.config_large.sequence_parallel)
        tp = self.config_large.tensor_model_parallel_size
        if config.vocab_size % tp:
            raise ValueError(f"vocab_size: {config.vocab_size} is not divisible by tensor parallel size {tp}")
        spec = llama_layer_spec()
        self.input_tensor: torch.Tensor | None = None

        if layout.pre_process:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                config.vocab_size, small.hidden_size, init_method=_normal_init(self.config_small.init_method_std),
                reduce_scatter_embeddings=self.sequence_parallel, config=self.config_small,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
            )
            self._freeze_padding_row(config.pad_token_id)
        if len(layout.first):
            self.layers_first = self._block(self.config_small, spec, len(layout.first))
            self.rotary_first = LlamaRotaryAngles(small, "config_8b")
        if layout.has_adapter:
            self.adapter = ParallelSplitAdapter(
                config.adapter, small.hidden_size, large.hidden_size, self.config_large,
                inner_size=config.adapter_hidden_size if config.adapter == "mlp" else config.adapter_rank,
                bias=config.adapter_bias,
            )
        if len(layout.last):
            self.layers_last = self._block(self.config_large, spec, len(layout.last))
            self.rotary_last = LlamaRotaryAngles(large, "config_70b")
        if layout.post_process:
            self.norm = LlamaRMSNormTP(self.config_large, large.hidden_size, eps=large.rms_norm_eps)

    def _freeze_padding_row(self, pad_token_id: int | None) -> None:
        """The padding token's embedding gets no gradient, as in transformers' ``nn.Embedding(padding_idx=pad_token_id)``
        (the HF backend's embedding): without this the two backends train that row differently wherever the pad
        id occurs as an input. Only the rank whose vocabulary slice holds the id has the row."""
        embed = self.embed_tokens
        if pad_token_id is None or not embed.vocab_start_index <= pad_token_id < embed.vocab_end_index:
            return
        row = pad_token_id - embed.vocab_start_index

        def zero_padding_row(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[row] = 0
            return grad

        embed.weight.register_hook(zero_padding_row)

    @staticmethod
    def _block(config: Any, spec: Any, count: int) -> TransformerBlock:
        return TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[spec] * count, layer_norm=None),
            post_layer_norm=False, pre_process=True, post_process=False,
        )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Pipeline schedules hand a stage its input here (a list of one tensor, or a tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        packed_seq_params: PackedSeqParams | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids``/``position_ids`` ``[b, s]`` -> hidden ``[s, b, h]`` (``[s/tp, b, h]`` with SP)."""
        if self.layout.pre_process:
            hidden = self.embed_tokens(input_ids)
            if not self.sequence_parallel:  # the SP embedding already returns [s/tp, b, h]
                hidden = hidden.transpose(0, 1).contiguous()
        else:
            if self.input_tensor is None:
                raise RuntimeError("pipeline stage without embeddings: call set_input_tensor() before forward")
            hidden = self.input_tensor
        if len(self.layout.first):
            hidden = self.layers_first(
                hidden_states=hidden, attention_mask=attention_mask,
                rotary_pos_emb=self.rotary_first(position_ids), packed_seq_params=packed_seq_params,
            )
        if self.layout.has_adapter:
            hidden = self.adapter(hidden)
        if len(self.layout.last):
            hidden = self.layers_last(
                hidden_states=hidden, attention_mask=attention_mask,
                rotary_pos_emb=self.rotary_last(position_ids), packed_seq_params=packed_seq_params,
            )
        if self.layout.post_process:
            hidden = self.norm(hidden)
        return hidden


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron-convention mask ``[b, 1, s, s]`` (True = masked) from a ``[b, s]`` padding mask, causal.

    A padding query may still see itself, so no softmax row is empty (no NaN reaches real tokens).
    """
    keep = attention_mask.to(torch.bool)
    seq = keep.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
    allowed = causal[None] & keep[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=keep.device)[None]
    return ~allowed[:, None]


class ParallelSplitLlama(nn.Module):
    """The one implementation behind every megatron split-model class.

    Args:
        config: the split model's :class:`SplitLlamaConfig` (both donor configs inside), kept as
            ``split_config``; ``config`` becomes the ``TransformerConfig`` megatron's schedules read.
        megatron_config: megatron's ``ModelParallelConfig`` (or a ``TransformerConfig``): tensor
            parallel size, sequence parallelism, ``params_dtype``, CPU or GPU initialisation.
        pre_process / post_process: for pipeline stages (default: from megatron's parallel state).
    """

    model_type = ModelType.encoder_or_decoder  #: read by megatron's schedules
    head: str | None = None  #: None | "lm" | "value"
    rmpad: bool = False  #: pack the documents of a padded batch into one row
    pipeline: bool = False  #: a stage of a pipeline (layers of this stage only)

    def __init__(
        self,
        config: SplitLlamaConfig,
        megatron_config: ModelParallelConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, SplitLlamaConfig):
            config = SplitLlamaConfig(**config.to_dict()) if hasattr(config, "to_dict") else SplitLlamaConfig(**config)
        self.split_config = config
        self.megatron_config = megatron_config
        pp_size = parallel_state.get_pipeline_model_parallel_world_size() if self.pipeline else 1
        pp_rank = parallel_state.get_pipeline_model_parallel_rank() if self.pipeline else 0
        if not self.pipeline and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError(f"{type(self).__name__} holds the whole model; with pipeline parallelism use the *PP classes")
        layout = SplitStageLayout.for_stage(config, pp_rank, pp_size)
        if pre_process is not None and pre_process != layout.pre_process or post_process is not None and post_process != layout.post_process:
            raise ValueError(
                f"pre_process={pre_process}, post_process={post_process} disagree with pipeline stage {pp_rank} of {pp_size}"
            )
        self.layout = layout
        self.model = ParallelSplitLlamaBody(config, megatron_config, layout)
        #: what megatron's pipeline schedule reads as ``model.config`` (the split model's config is ``split_config``)
        self.config = donor_transformer_config(
            config.config_70b, megatron_config, config.num_layers_8 + config.num_layers_70, "config_70b", for_schedule=True
        )
        self.tp_size = self.model.config_large.tensor_model_parallel_size
        self.sequence_parallel = self.model.sequence_parallel
        large = config.config_70b
        if layout.post_process and self.head == "lm":
            self.lm_head = tensor_parallel.ColumnParallelLinear(
                large.hidden_size, config.vocab_size, config=self.model.config_large,
                init_method=_normal_init(self.model.config_large.init_method_std), bias=False, gather_output=False,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
            )
        elif layout.post_process and self.head == "value":
            dtype = self.model.config_large.params_dtype
            device = None if self.model.config_large.use_cpu_initialization else torch.cuda.current_device()
            self.value_head = nn.Linear(large.hidden_size, 1, bias=True, dtype=dtype, device=device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            for p in self.value_head.parameters():  # replicated; partial gradients under SP
                p.sequence_parallel = self.sequence_parallel

    # ---------------------------------------------------------------- megatron pipeline hooks
    def set_input_tensor(self, input_tensor: Any) -> None:
        self.model.set_input_tensor(input_tensor)

    @property
    def pre_process(self) -> bool:
        return self.layout.pre_process

    @property
    def post_process(self) -> bool:
        return self.layout.post_process

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        gather_logits: bool = True,
        **unused: Any,
    ) -> Any:
        """Batch-first in, batch-first out.

        ``input_ids`` ``[b, s]``; ``attention_mask`` ``[b, s]`` (1 = token) marks padding. The
        packed (``RmPad``) classes remove the padding and pack the documents into one row;
        ``packed_seq_params`` (cumulative lengths) says the input is packed already
        (``input_ids`` ``[1, total]``). On a pipeline stage before the last, the output is the
        hidden state in megatron's ``[s, b, h]`` layout, for the next stage.
        """
        packed: PackedBatch | None = None
        mask = None
        if packed_seq_params is not None:
            if input_ids is not None and input_ids.shape[0] != 1:
                raise ValueError(f"packed input (packed_seq_params given) must be one row [1, total], got {list(input_ids.shape)}")
            cu = packed_seq_params.cu_seqlens_q
            packed_seq_params = make_packed_seq_params(cu, packed_seq_params.max_seqlen_q or int((cu[1:] - cu[:-1]).max()))
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu, cu.device)[None]
        elif self.rmpad:
            multiple = self.tp_size if self.sequence_parallel else 1
            packed = pack_sequences(input_ids, attention_mask, multiple)
            if position_ids is not None:  # caller's positions for the real tokens
                pos = position_ids.reshape(-1)[packed.indices]
                packed.position_ids[0, : packed.real_tokens] = pos
            input_ids, position_ids = packed.input_ids, packed.position_ids
            packed_seq_params = packed.packed_seq_params()
        elif not attention_mask_is_trivial(attention_mask):
            mask = padding_attention_mask(attention_mask)
        if position_ids is None:
            seq = input_ids.shape[1] if input_ids is not None else self._sequence_length()
            device = input_ids.device if input_ids is not None else self.model.input_tensor.device
            position_ids = torch.arange(seq, device=device)[None]
            if input_ids is not None and input_ids.shape[0] > 1:
                position_ids = position_ids.expand(input_ids.shape[0], -1)
        hidden = self.model(input_ids, position_ids, packed_seq_params, mask)
        if not self.layout.post_process:
            return hidden
        if self.head == "lm":
            return self._lm_output(hidden, labels, packed, packed_seq_params, gather_logits)
        if self.head == "value":
            return self._value_output(hidden, packed)
        hidden = self._gather_sequence(hidden).transpose(0, 1)
        if packed is not None:
            hidden = packed.unpack(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    def _sequence_length(self) -> int:
        seq = self.model.input_tensor.shape[0]
        return seq * self.tp_size if self.sequence_parallel else seq

    def _gather_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden

    def _lm_output(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None,
        packed: PackedBatch | None,
        packed_seq_params: PackedSeqParams | None,
        gather_logits: bool,
    ) -> CausalLMOutputWithPast:
        logits, _ = self.lm_head(hidden)  # [s, b, V/tp]
        loss = None
        if labels is not None:
            if packed is not None:
                labels = labels.reshape(-1)[packed.indices]
                labels = torch.cat([labels, labels.new_full((packed.input_ids.shape[1] - packed.real_tokens,), IGNORE_INDEX)])[None]
                cu = packed.cu_seqlens
            else:
                cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
            loss = parallel_next_token_loss(logits, labels, cu_seqlens=cu, keep_logits=gather_logits)
        if not gather_logits:
            return CausalLMOutputWithPast(loss=loss, logits=None)
        logits = gather_last_dim_from_tensor_parallel(logits)
        logits = logits.transpose(0, 1)
        if packed is not None:
            logits = packed.unpack(logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _value_output(self, hidden: torch.Tensor, packed: PackedBatch | None) -> SplitLlamaValueOutput:
        values = self.value_head(hidden).squeeze(-1)  # [s(/tp), b]
        values = self._gather_sequence(values).transpose(0, 1)
        if packed is not None:
            values = packed.unpack(values)
        return SplitLlamaValueOutput(values=values)


def parallel_next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, keep_logits: bool = True
) -> torch.Tensor:
    """Mean next-token loss with HF semantics on vocab-parallel logits ``[s, b, V/tp]``.

    ``labels`` ``[b, s]`` are shifted here (position t predicts label t+1); ``-100`` is ignored,
    and so is the last token of every packed document (its successor belongs to another one).
    """
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(torch.long) - 1
        ends = ends[(ends >= 0) & (ends < target.shape[1])]
        target[:, ends] = IGNORE_INDEX
    target = target.transpose(0, 1).contiguous()  # [s, b]
    valid = target != IGNORE_INDEX
    count = valid.sum()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        # the whole vocabulary is here: torch's fused cross entropy, as the HF backend computes it
        # (megatron's vocab-parallel version makes several more passes over the [s, b, V] logits)
        per_token_sum = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return per_token_sum / count.clamp(min=1)
    # megatron's cross entropy overwrites a float32 input with the softmax: keep returned logits intact
    source = logits.float() if logits.dtype != torch.float32 or not keep_logits else logits.clone()
    per_token = tensor_parallel.vocab_parallel_cross_entropy(source, target.masked_fill(~valid, 0))
    return (per_token * valid).sum() / count.clamp(min=1)


# ------------------------------------------------------------------------------------------ seed names
class ParallelCustomSplitLLamaModel(ParallelSplitLlama):
    """Embeddings, both donors' layers, adapter and final norm; ``last_hidden_state`` ``[b, s, h_l]``."""


class ParallelCustomSplitLLamaForCausalLM(ParallelSplitLlama):
    """Causal LM on padded batches: ``logits`` ``[b, s, vocab]`` (gathered over TP) and ``loss`` from ``labels``."""

    head = "lm"


class ParallelCustomSplitLLamaModelRmPad(ParallelSplitLlama):
    """:class:`ParallelCustomSplitLLamaModel` on packed documents (padding removed)."""

    rmpad = True


class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelSplitLlama):
    """Causal LM on packed documents: padding is removed before the layers and restored in the logits."""

    head = "lm"
    rmpad = True


class ParallelCustomSplitLLamaForValueRmPad(ParallelSplitLlama):
    """Critic on packed documents: ``values`` ``[b, s]`` (one scalar per token) from a replicated value head."""

    head = "value"
    rmpad = True


class ParallelCustomSplitLLamaForCausalLMRmPadPP(ParallelSplitLlama):
    """One pipeline stage of the packed causal LM (run through megatron's forward-backward schedule)."""

    head = "lm"
    rmpad = True
    pipeline = True


class ParallelCustomSplitLLamaForValueRmPadPP(ParallelSplitLlama):
    """One pipeline stage of the packed critic."""

    head = "value"
    rmpad = True
    pipeline = True


__all__ = [
    "IGNORE_INDEX",
    "PackedBatch",
    "ParallelCustomSplitLLamaForCausalLM",
    "ParallelCustomSplitLLamaForCausalLMRmPad",
    "ParallelCustomSplitLLamaForCausalLMRmPadPP",
    "ParallelCustomSplitLLamaForValueRmPad",
    "ParallelCustomSplitLLamaForValueRmPadPP",
    "ParallelCustomSplitLLamaModel",
    "ParallelCustomSplitLLamaModelRmPad",
    "ParallelSplitLlama",
    "ParallelSplitLlamaBody",
    "SplitStageLayout",
    "make_packed_seq_params",
    "pack_sequences",
    "parallel_next_token_loss",
    "positions_from_cu_seqlens",
]
