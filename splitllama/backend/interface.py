"""The backend interface: what to build (:class:`SplitModelSpec`) and what a built model offers (:class:`SplitBackend`).

A backend object (:class:`splitllama.backend.spec.BackendSpec`, chosen by ``conf/backend/<name>.yaml``'s
``_target_``) builds a :class:`SplitBackend` for a :class:`SplitModelSpec`: the split model (assembled
from donors, or loaded from a saved split model), which selects what trains and exports a Hugging Face
split checkpoint. The LightningModule only calls the :class:`SplitBackend` methods, so another
implementation (the megatron-core one in ``splitllama.megatron``) plugs in with its own ``BackendSpec``
subclass and YAML file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..configuration_split_llama import SplitLlamaConfig


@dataclass
class SplitModelSpec:
    """What to build: a split model from two donors, or a saved split model (``model_dir``)."""

    path8b: str | None = None
    path70b: str | None = None
    num_layers_8: int | None = None
    num_layers_70: int | None = None
    layers_8: list[int] | None = None
    layers_70: list[int] | None = None
    adapter: str = "linear"
    adapter_init: str | None = None
    adapter_hidden_size: int | None = None
    adapter_rank: int | None = None
    adapter_bias: bool = True
    adapter_checkpoint: str | None = None
    #: token ids ``(batch, seq)`` for ``adapter_init="lstsq"``
    calibration: torch.Tensor | None = field(default=None, repr=False)
    model_dir: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    seed: int = 0
    #: the validated split config, when the run already holds it (see :meth:`split_config`)
    config: SplitLlamaConfig | None = field(default=None, repr=False)

    def split_config(self) -> SplitLlamaConfig:
        """The validated split config: built from the fields once (reads only the donors' config.json,
        no weights), then carried; every backend builds its model from this one object."""
        if self.config is None:
            if self.model_dir is not None:
                self.config = SplitLlamaConfig.from_pretrained(self.model_dir)
            else:
                self.config = SplitLlamaConfig(
                    path8b=self.path8b, path70b=self.path70b, num_layers_8=self.num_layers_8, num_layers_70=self.num_layers_70,
                    layers_8=self.layers_8, layers_70=self.layers_70, adapter=self.adapter,
                    adapter_hidden_size=self.adapter_hidden_size, adapter_rank=self.adapter_rank, adapter_bias=self.adapter_bias,
                )
        return self.config


@runtime_checkable
class SplitBackend(Protocol):
    """What the LightningModule needs from a backend."""

    name: str
    #: the trainable module (registered under the LightningModule); forward(input_ids) -> logits via :meth:`logits`
    model: nn.Module
    config: SplitLlamaConfig
    #: True: the backend runs forward and backward itself over micro-batches (``run_schedule`` and
    #: ``clip_grad_norm``, see ``splitllama.megatron.model``); the module uses manual optimisation
    manual_schedule: bool
    #: True: ``export_hf`` is collective (every rank calls it; model-parallel shards are gathered)
    collective_export: bool

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def parameter_counts(self) -> dict[str, int]:
        """``{"total", "trainable"}`` of the whole model (a model-parallel backend counts across its shards)."""
        ...

    def select_trainable(self, parts: Sequence[str], lora: dict[str, Any] | None) -> list[str]: ...

    def export_hf(self, out_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Path: ...


__all__ = ["SplitBackend", "SplitModelSpec"]
