"""The split LLaMA model for vLLM, built from vLLM's own layers.

::

    input_ids -> VocabParallelEmbedding (h_s)
              -> model.layers.0 .. N-1     vLLM LlamaDecoderLayer built from config_8b
              -> model.layers.N            SplitAdapterLayer (h_s -> h_l, vLLM parallel linears)
              -> model.layers.N+1 .. N+M   vLLM LlamaDecoderLayer built from config_70b
              -> RMSNorm -> ParallelLMHead -> LogitsProcessor

One stack numbered globally (see :mod:`splitllama.vllm.loading`): vLLM binds a KV cache to each
attention layer by the integer in its module path, and splits a stack across pipeline stages by
position, so the adapter is a layer of the stack like any other.

vLLM's ``LlamaDecoderLayer`` returns ``(hidden, residual)`` and leaves the residual add to the next
norm; the adapter adds them before mapping and starts a fresh residual stream.

Tensor parallelism: the donor layers shard as vLLM shards LLaMA. The adapter shards without an
extra gather: ``linear`` is a ``RowParallelLinear`` on the replicated input
(``input_is_parallel=False``, one all-reduce); ``mlp`` is column-parallel -> ReLU -> row-parallel,
``lowrank`` the same without the ReLU. Pipeline parallelism splits the stack anywhere; the hidden
size sent between stages is ``h_s`` up to the adapter and ``h_l`` after it.

This module imports vLLM: vLLM imports it lazily (``splitllama.vllm.plugin`` registers it by name).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import PPMissingLayer, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from ..checkpoint import CheckpointError
from ..configuration_split_llama import SplitConfigError, SplitLlamaConfig
from .loading import (
    VLLM_LAYER_NAMES,
    VllmTarget,
    adapter_layer_index,
    check_split_checkpoint,
    check_vllm_compatible,
    expected_checkpoint_tensors,
    num_vllm_layers,
    vllm_target,
)

#: Under vLLM's logger, whose handlers print to the engine's log (a plain module logger stays silent there).
logger = init_logger(f"vllm.{__name__}")


def _split_config(vllm_config: VllmConfig) -> SplitLlamaConfig:
    config = vllm_config.model_config.hf_config
    if not isinstance(config, SplitLlamaConfig):
        raise SplitConfigError(
            f"CustomSplitLLamaForCausalLM needs a SplitLlamaConfig (model_type 'custom_split_llama'), "
            f"but vLLM loaded a {type(config).__name__} from {vllm_config.model_config.model}"
        )
    return config


class SplitAdapterLayer(nn.Module):
    """The adapter as a layer of the vLLM stack: ``(positions, hidden, residual) -> (hidden, None)``.

    Parameter names match the split checkpoint's ``model.adapter.*`` (``adapter_linear_1/2``).
    """

    def __init__(self, config: SplitLlamaConfig, prefix: str = "") -> None:
        super().__init__()
        self.kind = config.adapter
        h_s, h_l, bias = config.hidden_size_8, config.hidden_size_70, config.adapter_bias
        if self.kind == "linear":
            self.adapter_linear_1 = RowParallelLinear(
                h_s, h_l, bias=bias, input_is_parallel=False, prefix=f"{prefix}.adapter_linear_1"
            )
        elif self.kind in ("mlp", "lowrank"):
            inner = config.adapter_hidden_size if self.kind == "mlp" else config.adapter_rank
            self.adapter_linear_1 = ColumnParallelLinear(
                h_s, inner, bias=bias and self.kind == "mlp", gather_output=False, prefix=f"{prefix}.adapter_linear_1"
            )
            self.adapter_linear_2 = RowParallelLinear(
                inner, h_l, bias=bias, input_is_parallel=True, prefix=f"{prefix}.adapter_linear_2"
            )
        elif self.kind != "identity":
            raise SplitConfigError(f"SplitLlamaConfig.adapter: unknown adapter {self.kind!r}")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        if residual is not None:
            hidden_states = hidden_states + residual
        if self.kind == "identity":
            return hidden_states, None
        hidden_states, _ = self.adapter_linear_1(hidden_states)
        if self.kind == "mlp":
            hidden_states = torch.relu(hidden_states)
        if self.kind in ("mlp", "lowrank"):
            hidden_states, _ = self.adapter_linear_2(hidden_states)
        return hidden_states, None


@support_torch_compile(
    dynamic_arg_dims={  # as vLLM's LlamaModel: the token dimension is dynamic
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class SplitLlamaModel(nn.Module):
    """Embeddings, the global layer stack (donor layers and adapter) and the final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _split_config(vllm_config)
        self.config = config
        n = config.num_layers_8
        self.adapter_index = adapter_layer_index(config)
        pp = get_pp_group()

        if pp.is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size_8, quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()

        def build_layer(prefix: str) -> nn.Module:
            index = int(prefix.rsplit(".", 1)[1])
            if index == self.adapter_index:
                return SplitAdapterLayer(config, prefix=prefix)
            donor = config.config_8b if index < n else config.config_70b
            return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=donor)

        self.start_layer, self.end_layer, self.layers = make_layers(
            num_vllm_layers(config), build_layer, prefix=f"{prefix}.layers"
        )
        if pp.is_last_rank:
            self.norm = RMSNorm(config.hidden_size_70, eps=config.config_70b.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()

    def input_hidden_size(self) -> int:
        """Hidden size entering this pipeline stage: small up to and including the adapter, then large."""
        return self.config.hidden_size_8 if self.start_layer <= self.adapter_index else self.config.hidden_size_70

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        size = self.input_hidden_size()
        return IntermediateTensors(
            {key: torch.zeros((batch_size, size), dtype=dtype, device=device) for key in ("hidden_states", "residual")}
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]

        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)

        if not get_pp_group().is_last_rank:
            if residual is None:  # this stage ended with the adapter: nothing to add downstream
                residual = torch.zeros_like(hidden_states)
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class CustomSplitLLamaForCausalLM(nn.Module, SupportsPP):
    """vLLM model for ``architectures: ["CustomSplitLLamaForCausalLM"]`` (a saved split checkpoint).

    The interface vLLM asks of a model: ``__init__(*, vllm_config, prefix)``, ``embed_input_ids``
    (``get_input_embeddings`` is kept as the older name), ``forward``, ``compute_logits`` and
    ``load_weights``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _split_config(vllm_config)
        self.config = config
        check_vllm_compatible(config, get_tensor_model_parallel_world_size())
        model_dir = vllm_config.model_config.model
        load_format = str(getattr(vllm_config.load_config, "load_format", "auto"))
        if load_format != "dummy" and os.path.isdir(model_dir):
            # Headers only: a missing tensor or a wrong shape fails before any allocation.
            check_split_checkpoint(config, model_dir)
        self.model = SplitLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size_70, quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        #: The load in progress (``None`` between loads): see :meth:`load_weights`.
        self._load: WeightLoad | None = None
        #: Whether vLLM's disk loader is still to call :meth:`load_weights` (with the whole checkpoint).
        self._disk_load_pending = load_format != "dummy"

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Older name of :meth:`embed_input_ids` (the custom-model note's interface)."""
        return self.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self._load is not None:  # a load (sync) ended without a check: no logits from partial weights
            self.check_weights_loaded()
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load split-checkpoint tensors, fusing q/k/v and gate/up; one call or many, in any grouping.

        vLLM's disk loader calls this once with the whole checkpoint; a trainer syncing a rollout
        engine (veRL: one call per bucket of HF-named tensors; TRL: one call per parameter) calls
        it many times. Every call adds to the current *load*; :meth:`check_weights_loaded` closes it
        and raises :class:`CheckpointError` naming each tensor the load lacks. It runs at the end
        of the disk load (the first call when the engine did not start from dummy weights), by
        hand after a sync, and by itself before the next logits are computed, so a sync that
        misses a tensor never leaves stale or dummy values in place silently.

        Names map through :func:`splitllama.vllm.loading.vllm_target`. Tensors of layers that live
        on another pipeline stage are skipped; tensors the model has no place for are skipped
        with a warning. Returns the vLLM parameters filled so far in this load.
        """
        params: dict[str, nn.Parameter] = {}
        for name, tensor in weights:
            load = self._open_load()  # opened by a tensor: an empty call (veRL's last bucket may be one) opens none
            # looked up per call: vLLM's layerwise reload swaps parameters for buffering ones and back
            params = params or dict(self.named_parameters())
            target = vllm_target(self.config, name)
            if target is not None and target.param not in params:
                if not self._on_other_stage(target.param, target.layer):
                    raise CheckpointError(f"tensor {name}: the vLLM model has no parameter {target.param}")
                load.skip_other_stage(name)
                continue
            load.add(name, tensor, target, params)
        if self._disk_load_pending:  # vLLM's loader hands over the whole checkpoint in this one call
            self._disk_load_pending = False
            loaded = self._open_load().loaded_params()
            self.check_weights_loaded(source="the checkpoint")
            return loaded
        return self._load.loaded_params() if self._load is not None else set()

    def _open_load(self) -> WeightLoad:
        if self._load is None:
            self._load = WeightLoad([name for name, _ in self.named_parameters()])
        return self._load

    def check_weights_loaded(self, source: str = "the weights loaded since the last check") -> None:
        """Close the current load; raise :class:`CheckpointError` naming what it lacks.

        Call it after a weight sync (``llm.apply_model(lambda m: m.check_weights_loaded())``);
        :meth:`compute_logits` calls it before the first logits after a load. A no-op when no
        load is open.
        """
        load, self._load = self._load, None
        if load is not None:
            load.check_complete(expected_checkpoint_tensors(self.config), source)

    def _on_other_stage(self, param: str, layer: int | None) -> bool:
        """Whether ``param`` belongs to a module this pipeline stage does not hold."""
        if layer is not None:
            return not self.model.start_layer <= layer < self.model.end_layer
        try:
            return isinstance(self.get_submodule(param.rsplit(".", 1)[0]), PPMissingLayer)
        except AttributeError:
            return False


class WeightLoad:
    """What one load (vLLM's disk load, or one weight sync of many ``load_weights`` calls) filled."""

    def __init__(self, param_names: list[str]) -> None:
        self.needed_parts = _needed_parts(param_names)
        self.filled: dict[str, set[str | int | None]] = {name: set() for name in param_names}
        self.seen: set[str] = set()
        self.unknown: list[str] = []
        self.skipped = 0

    def skip_other_stage(self, name: str) -> None:
        self.seen.add(name)
        self.skipped += 1

    def add(self, name: str, tensor: torch.Tensor, target: VllmTarget | None, params: dict[str, nn.Parameter]) -> None:
        """Copy ``tensor`` into its place (``target`` among ``params``; ``None``: the model has none)."""
        self.seen.add(name)
        if target is None:
            self.unknown.append(name)
            return
        param = params[target.param]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if target.shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, target.shard)
        self.filled[target.param].add(target.shard)

    def loaded_params(self) -> set[str]:
        return {n for n, parts in self.filled.items() if parts}

    def check_complete(self, expected: list[str], source: str) -> None:
        """Raise :class:`CheckpointError` unless every tensor of ``expected`` came and every part
        of every parameter of this stage was filled; else log what was loaded and skipped."""
        absent = [n for n in expected if n not in self.seen]
        unfilled = sorted(
            f"{n}{'' if parts == {None} else ' ' + str(sorted(map(str, parts - self.filled[n])))}"
            for n, parts in self.needed_parts.items()
            if parts - self.filled[n]
        )
        if absent or unfilled:
            raise CheckpointError(
                f"split model weights incomplete: {len(absent)} tensor(s) not in {source} {absent[:10]}; "
                f"{len(unfilled)} vLLM parameter(s) not filled {unfilled[:10]}"
            )
        if self.unknown:
            logger.warning("split model: skipped %d tensor(s) it has no place for: %s", len(self.unknown), self.unknown[:8])
        logger.info(
            "split model: loaded %d tensors into %d vLLM parameters; skipped %d on other pipeline stages and %d unknown",
            len(self.seen) - self.skipped - len(self.unknown), len(self.loaded_params()), self.skipped, len(self.unknown),
        )


def _needed_parts(param_names: list[str]) -> dict[str, set[str | int | None]]:
    """For each parameter, the shard ids a checkpoint must fill (``{None}`` for unpacked ones)."""
    packed: dict[str, set[str | int | None]] = {}
    for relative, shard in VLLM_LAYER_NAMES.values():
        if shard is not None:
            packed.setdefault(relative, set()).add(shard)
    needed: dict[str, set[str | int | None]] = {}
    for name in param_names:
        _, _, tail = name.partition("model.layers.")
        relative = tail.split(".", 1)[1] if tail else ""
        needed[name] = packed.get(relative, {None})
    return needed


__all__ = ["CustomSplitLLamaForCausalLM", "SplitAdapterLayer", "SplitLlamaModel", "WeightLoad"]
