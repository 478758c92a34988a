"""Per-donor ``TransformerConfig`` and the LLaMA layer spec of the megatron backend.

Each donor's layers are a megatron ``TransformerBlock`` built from that donor's own
``TransformerConfig`` (hidden size, heads, KV groups, FFN, eps), sharing the parallel settings
(tensor parallel size, sequence parallelism, dtype) of the one ``ModelParallelConfig`` the model is
given. Pipeline parallelism is arranged by the split model itself (which layers a stage holds,
see ``SplitStageLayout``), so the donor configs say ``pipeline_model_parallel_size=1``.

The layer spec is megatron-core's own local (no TransformerEngine) GPT layer with three pieces
swapped: core attention on torch SDPA, an RMSNorm with the donors' numerics that also works
under sequence parallelism, and the MLP's SwiGLU (``swiglu.py`` says why).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from .._compat import require_megatron

require_megatron()

from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from .attention import SDPACoreAttention  # noqa: E402
from .norm import LlamaRMSNormTP  # noqa: E402
from .swiglu import SwiGLU  # noqa: E402


#: TransformerConfig fields also taken from the given megatron config when it has them
CARRIED_FIELDS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


def parallel_settings(megatron_config: ModelParallelConfig) -> dict[str, Any]:
    """The ``ModelParallelConfig`` fields (and activation recomputation) of ``megatron_config``, for each donor's config."""
    names = {f.name for f in dataclasses.fields(ModelParallelConfig) if f.init} | set(CARRIED_FIELDS)
    return {name: getattr(megatron_config, name) for name in names if hasattr(megatron_config, name)}


def check_donor_supported(donor: Any, field: str, tp: int) -> None:
    """Reject donor features this backend does not implement, naming the field and the allowed values."""
    if getattr(donor, "attention_bias", False):
        raise ValueError(f"{field}.attention_bias: must be false for the megatron backend (LLaMA has no q/k/v bias)")
    if getattr(donor, "mlp_bias", False):
        raise ValueError(f"{field}.mlp_bias: must be false for the megatron backend")
    if getattr(donor, "hidden_act", "silu") != "silu":
        raise ValueError(f"{field}.hidden_act: must be 'silu', got {donor.hidden_act!r}")
    heads, groups = donor.num_attention_heads, donor.num_key_value_heads
    if heads % tp or groups % tp:
        raise ValueError(
            f"{field}: tensor parallel size {tp} must divide num_attention_heads ({heads}) and "
            f"num_key_value_heads ({groups})"
        )
    if donor.intermediate_size % tp:
        raise ValueError(f"{field}.intermediate_size: {donor.intermediate_size} is not divisible by tensor parallel size {tp}")


def donor_transformer_config(
    donor: Any, megatron_config: ModelParallelConfig, num_layers: int, field: str, *, for_schedule: bool = False
) -> TransformerConfig:
    """A ``TransformerConfig`` for the layers of one LLaMA donor (``config_8b`` or ``config_70b``).

    ``for_schedule`` keeps the pipeline size: that copy is the one megatron's pipeline schedule
    reads (``model.config``); the blocks' copies say 1, since the split model places layers itself.
    """
    settings = parallel_settings(megatron_config)
    check_donor_supported(donor, field, settings.get("tensor_model_parallel_size", 1))
    if not for_schedule:
        settings.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None)
    settings["gradient_accumulation_fusion"] = False  # needs Apex
    # megatron-core 0.19 refuses variable_seq_lengths (our PP stages) with the default MoE dispatcher
    # "allgather", even in a dense model; "alltoall" is accepted and unused here (no experts)
    settings["moe_token_dispatcher_type"] = "alltoall"
    head_dim = getattr(donor, "head_dim", None) or donor.hidden_size // donor.num_attention_heads
    return TransformerConfig(
        **settings,
        num_layers=max(num_layers, 1),
        hidden_size=donor.hidden_size,
        num_attention_heads=donor.num_attention_heads,
        num_query_groups=donor.num_key_value_heads,
        kv_channels=head_dim,
        ffn_hidden_size=donor.intermediate_size,
        layernorm_epsilon=donor.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(donor, "initializer_range", 0.02),
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        # megatron then calls the spec's activation module (our SwiGLU) on the whole fc1 output;
        # the name is megatron's, no TransformerEngine is involved
        use_te_activation_func=True,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
    )


def llama_layer_spec() -> ModuleSpec:
    """megatron-core's local GPT layer with SDPA core attention, the LLaMA RMSNorm and our SwiGLU."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    attention = sub.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    mlp = _with_activation(sub.mlp, SwiGLU)
    sub = dataclasses.replace(
        sub, input_layernorm=LlamaRMSNormTP, pre_mlp_layernorm=LlamaRMSNormTP, self_attention=attention, mlp=mlp
    )
    return dataclasses.replace(spec, submodules=sub)


def _with_activation(mlp: Any, activation: type) -> Any:
    """The MLP spec with ``activation`` as its activation module.

    megatron-core 0.16 describes the MLP as a ``ModuleSpec``, 0.19 as a ``functools.partial`` of
    its builder; both carry ``MLPSubmodules``.
    """
    if isinstance(mlp, functools.partial):
        submodules = dataclasses.replace(mlp.keywords["submodules"], activation_func=activation)
        return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, activation_func=activation))


def dtype_flags(dtype: torch.dtype) -> dict[str, Any]:
    """``params_dtype``/``bf16``/``fp16`` for a parameter dtype."""
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


__all__ = [
    "check_donor_supported",
    "donor_transformer_config",
    "dtype_flags",
    "llama_layer_spec",
    "parallel_settings",
]
