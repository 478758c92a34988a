"""What the Lightning training stack needs to run ``backend=megatron``, by the names it always had.

The code lives by concern: the model and its ``SplitBackend`` in :mod:`splitllama.megatron.model`,
gradient collectives in :mod:`splitllama.megatron.grads`, the Lightning strategy in
:mod:`splitllama.megatron.strategy`, the backend object (settings, checks, strategy, build) in
:mod:`splitllama.megatron.backend`.
"""

from __future__ import annotations

from .backend import MEGATRON_PART_PREFIXES, MegatronBackendSpec, build_megatron_backend
from .grads import (
    allreduce_data_parallel_grads,
    allreduce_sequence_parallel_grads,
    broadcast_trainable_params,
    clip_grad_norm_model_parallel,
    model_parallel_grad_norm,
    sequence_parallel_params,
)
from .model import LossFn, MegatronBackend, MegatronSplitModel, broadcast_from_last_stage, build_megatron_split_model, export_hf
from .strategy import MegatronStrategy

__all__ = [
    "MEGATRON_PART_PREFIXES",
    "LossFn",
    "MegatronBackend",
    "MegatronBackendSpec",
    "MegatronSplitModel",
    "MegatronStrategy",
    "allreduce_data_parallel_grads",
    "allreduce_sequence_parallel_grads",
    "broadcast_from_last_stage",
    "broadcast_trainable_params",
    "build_megatron_backend",
    "build_megatron_split_model",
    "clip_grad_norm_model_parallel",
    "export_hf",
    "model_parallel_grad_norm",
    "sequence_parallel_params",
]
