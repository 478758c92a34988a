"""Core attention on torch SDPA: a drop-in for megatron-core's ``DotProductAttention``.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix in a
CUDA buffer and rejects packed sequences; without TransformerEngine that is its only choice. This
module keeps megatron's interface (``[s, b, heads, head_dim]`` in, ``[s, b, heads * head_dim]`` out)
and calls ``torch.nn.functional.scaled_dot_product_attention``, which picks flash or memory-efficient
kernels on GPU and a fused kernel on CPU. On H100 this alone took megatron-core from about 30% to
57% MFU (DESIGN.md).

Packed sequences (several documents in one row, boundaries in ``PackedSeqParams.cu_seqlens_q``)
attend only within their own document: on CUDA through ``torch.nn.attention.varlen.varlen_attn``
where torch provides it (or one SDPA call per document), elsewhere through a block-diagonal causal
mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from .._compat import require_megatron

require_megatron()

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

try:  # torch >= 2.9 on CUDA: flash attention over cumulative sequence lengths
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None
    _VARLEN_PARAMS = set()


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[total, total]`` mask: True where token i may attend to token j (same document, j <= i)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if doc.numel() != total:
        raise ValueError(f"packed_seq_params: cu_seqlens cover {doc.numel()} tokens but the batch holds {total}")
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return causal & (doc[:, None] == doc[None, :])


class SDPACoreAttention(MegatronModule):
    """Causal self-attention through torch SDPA, with grouped-query attention and packed documents.

    The constructor takes the arguments megatron-core passes to any core attention (so it fits
    ``SelfAttentionSubmodules.core_attention``); dropout and context parallelism are not
    supported (LLaMA uses neither), and are rejected rather than ignored.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPACoreAttention: attention_dropout must be 0 for the split LLaMA, got {dropout}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention: context parallelism is not supported (context_parallel_size must be 1)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPACoreAttention: only causal attention is supported, got {attn_mask_type}")
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        **unused: Any,
    ) -> torch.Tensor:
        """``query`` ``[s, b, heads, d]``, ``key``/``value`` ``[s, b, groups, d]`` -> ``[s, b, heads * d]``.

        ``attention_mask`` (optional, ``[b, 1, s, s]`` boolean, True = masked, megatron's
        convention) replaces the plain causal mask for padded batches.
        """
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        seq, batch, heads, dim = query.shape
        gqa = heads != key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q", None) if packed_seq_params is not None else None
        if cu_seqlens is None and attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        elif cu_seqlens is None:  # megatron's convention: True = masked out (padding and future tokens)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            if batch != 1:
                raise ValueError(f"packed sequences come as one row (batch 1), got batch {batch}")
            out = self._packed(q, k, v, cu_seqlens, packed_seq_params, gqa)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    def _packed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, params: Any, gqa: bool
    ) -> torch.Tensor:
        total = q.shape[2]
        if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
            return self._varlen(q, k, v, cu_seqlens, params, gqa)
        if q.is_cuda:  # one flash/efficient call per document: no [t, t] mask
            bounds = cu_seqlens.tolist()
            outs = [
                F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
                )
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            return torch.cat(outs, dim=2)
        mask = packed_causal_mask(cu_seqlens, total, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=gqa)

    def _varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, params: Any, gqa: bool
    ) -> torch.Tensor:
        # varlen_attn takes [t, heads, d]
        qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
        if gqa and "enable_gqa" not in _VARLEN_PARAMS:
            repeat = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(repeat, dim=1), vt.repeat_interleave(repeat, dim=1)
        kwargs: dict[str, Any] = {}
        if "is_causal" in _VARLEN_PARAMS:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = self.softmax_scale
        if gqa and "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_len = params.max_seqlen_q
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = _varlen_attn(qt, kt, vt, cu, cu, int(max_len), int(max_len), **kwargs)
        return out.transpose(0, 1).unsqueeze(0)


__all__ = ["SDPACoreAttention", "packed_causal_mask"]
