"""The split LLaMA model for Hugging Face transformers, readable top to bottom.

::

    input_ids -> embed_tokens (small donor) -> layers_first (small donor layers, hidden h_s)
              -> adapter h_s -> h_l -> layers_last (large donor layers, hidden h_l)
              -> norm, lm_head (large donor)

Each donor's layers are transformers' own ``LlamaDecoderLayer`` built from that donor's config,
with that donor's rotary embedding, so a split model reproduces its donors exactly. The KV cache is
one transformers ``Cache`` with a slot per attention layer: small-donor layers use slots
``0..N-1``, large-donor layers ``N..N+M-1``.

Like the configuration module, this file imports only torch, transformers and
``.configuration_split_llama``: ``save_pretrained`` copies both next to the weights, so a saved
model also loads with ``trust_remote_code=True`` where splitllama is not installed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import ModelOutput

from .configuration_split_llama import SplitLlamaConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def declares_assembly(path: str | os.PathLike[str]) -> bool:
    """Whether ``path/config.json`` declares a seed-style directory (``"assemble_from_donors": true``)."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("assemble_from_donors") is True


def saved_model_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the split-model directory ``path`` cannot be loaded as it declares itself, or ``None``.

    A saved model must hold a weights file; a seed-style directory (``assemble_from_donors``)
    must not, since which weights count would be ambiguous. Checked before any weight is read.
    """
    path = os.fspath(path)
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    config_file = os.path.join(path, "config.json")
    if declares_assembly(path):
        if present:
            return (f"{config_file} declares assemble_from_donors=true, but {path} also holds {present[0]}: "
                    "remove one (a saved model keeps its weights; a seed-style directory has none)")
        return None
    if not present:
        return (f"{path}: no weights file ({', '.join(WEIGHT_FILES)}); a saved split model needs its weights. "
                f"To assemble it from its donors (path8b, path70b) instead, set \"assemble_from_donors\": true in {config_file}")
    return None


class SplitLlamaAdapter(nn.Module):
    """Maps small-donor hidden states (h_s) to large-donor hidden states (h_l).

    ``linear``: one linear h_s -> h_l. ``mlp``: linear -> ReLU -> linear. ``lowrank``: linear to
    ``adapter_rank`` then linear to h_l (a rank-limited linear map). ``identity``: no parameters
    (equal hidden sizes). Parameter names follow the original design (``adapter_linear_1/2``).
    """

    def __init__(self, config: SplitLlamaConfig) -> None:
        super().__init__()
        self.kind = config.adapter
        h_s, h_l, bias = config.hidden_size_8, config.hidden_size_70, config.adapter_bias
        if self.kind == "linear":
            self.adapter_linear_1 = nn.Linear(h_s, h_l, bias=bias)
        elif self.kind == "mlp":
            self.adapter_linear_1 = nn.Linear(h_s, config.adapter_hidden_size, bias=bias)
            self.act = nn.ReLU()
            self.adapter_linear_2 = nn.Linear(config.adapter_hidden_size, h_l, bias=bias)
        elif self.kind == "lowrank":
            self.adapter_linear_1 = nn.Linear(h_s, config.adapter_rank, bias=False)
            self.adapter_linear_2 = nn.Linear(config.adapter_rank, h_l, bias=bias)
        elif self.kind != "identity":
            raise ValueError(f"SplitLlamaConfig.adapter: unknown adapter {self.kind!r}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return hidden_states
        hidden_states = self.adapter_linear_1(hidden_states)
        if self.kind == "mlp":
            hidden_states = self.act(hidden_states)
        if self.kind in ("mlp", "lowrank"):
            hidden_states = self.adapter_linear_2(hidden_states)
        return hidden_states


#: ``"module:function"`` that assembles a seed-style directory (``assemble_from_donors``) from its donors;
#: set by the ``splitllama`` package (:func:`register_seed_dir_assembler`), so this file knows nothing of
#: the assembly code above it and still ships alone next to saved weights (``trust_remote_code``).
SEED_DIR_ASSEMBLER: str | None = None


def register_seed_dir_assembler(target: str) -> None:
    """Name the function (``"module:function"``) that :meth:`from_pretrained` calls for a seed-style directory."""
    global SEED_DIR_ASSEMBLER
    SEED_DIR_ASSEMBLER = target


def seed_dir_assembler(path: str) -> Any:
    """The registered seed-directory assembler, imported on first use (the assembly code stays unloaded until then)."""
    import importlib

    if SEED_DIR_ASSEMBLER is None:
        raise ImportError(f"{path} declares assemble_from_donors; assembling it from its donors needs the splitllama "
                          "package: `import splitllama` first (pip install splitllama)")
    module, _, name = SEED_DIR_ASSEMBLER.partition(":")
    return getattr(importlib.import_module(module), name)


class CustomSplitLLamaPreTrainedModel(PreTrainedModel):
    config_class = SplitLlamaConfig
    config: SplitLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    #: Parameters that may be absent from a checkpoint because they have a named, logged
    #: initialisation (the value head of a critic made from a causal LM starts at zero).
    _initialised_if_missing: tuple[str, ...] = ()
    #: checkpoint tensors this class drops on purpose (any other unexpected tensor is an error)
    _ignored_if_unexpected: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any, **kwargs: Any):
        """Load a saved split model, or assemble one from a seed-style directory.

        A seed-style directory declares itself: its ``config.json`` names ``path8b``, ``path70b``
        and layer counts and sets ``"assemble_from_donors": true``; the model is then assembled
        from the donors by :func:`splitllama.build_from_seed_dir` (that path needs the splitllama
        package). Any other directory is a saved model and must hold its weights: a missing
        weights file or parameter is an error, never donors plus a random adapter.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            problem = saved_model_problem(path)
            if problem:
                raise FileNotFoundError(problem)
            if declares_assembly(path):
                return seed_dir_assembler(path)(path, model_class=cls, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", []) if not k.startswith(cls._initialised_if_missing or ("\0",))]
        if missing:
            raise ValueError(
                f"{path}: checkpoint lacks {len(missing)} parameter(s) of {cls.__name__}: {sorted(missing)[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; refusing to initialise them randomly"
            )
        # a tensor the config has no place for (a layer past num_layers_70, another adapter's) would be dropped silently
        unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(cls._ignored_if_unexpected or ("\0",))]
        if unexpected:
            raise ValueError(
                f"{path}: checkpoint holds {len(unexpected)} tensor(s) its config.json has no place for: {sorted(unexpected)[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}; the config and the weights disagree"
            )
        mismatched = info.get("mismatched_keys", [])
        if mismatched:
            raise ValueError(f"{path}: checkpoint tensors of the wrong shape: {mismatched[:10]}")
        return (model, info) if want_info else model


    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """Save weights, config and remote code, plus the small donor's tokenizer when available.

        The split model reads the small donor's token ids, so its tokenizer is the model's
        tokenizer; it is copied from ``config.path8b`` unless the directory already has one.
        """
        self.config.assemble_from_donors = False  # the directory holds this model's weights
        super().save_pretrained(save_directory, *args, **kwargs)
        source = getattr(self.config, "path8b", None)
        if not source or not os.path.isdir(source) or os.path.exists(os.path.join(save_directory, "tokenizer_config.json")):
            return
        import shutil

        for name in TOKENIZER_FILES:
            src = os.path.join(source, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(save_directory, name))


class CustomSplitLLamaModel(CustomSplitLLamaPreTrainedModel):
    """Embeddings, small-donor layers, adapter, large-donor layers and final norm."""

    def __init__(self, config: SplitLlamaConfig) -> None:
        super().__init__(config)
        small, large = config.config_8b, config.config_70b
        n = config.num_layers_8
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, small.hidden_size, self.padding_idx)
        self.layers_first = nn.ModuleList([LlamaDecoderLayer(small, layer_idx=i) for i in range(n)])
        self.adapter = SplitLlamaAdapter(config)
        self.layers_last = nn.ModuleList(
            [LlamaDecoderLayer(large, layer_idx=n + j) for j in range(config.num_layers_70)]
        )
        self.norm = LlamaRMSNorm(large.hidden_size, eps=large.rms_norm_eps)
        self.rotary_emb_first = LlamaRotaryEmbedding(config=small)
        self.rotary_emb_last = LlamaRotaryEmbedding(config=large)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _sync_attn_implementation(self) -> None:
        """Donor layers read the attention implementation from their donor's config: keep it the model's."""
        impl = self.config._attn_implementation
        for donor in (self.config.config_8b, self.config.config_70b):
            if donor._attn_implementation != impl:
                donor._attn_implementation = impl

    def reset_rotary_embeddings(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) rotary buffers, e.g. after building on the meta device."""
        with torch.device(device or "cpu"):  # (transformers 5.17 and 5.19 differ in a `device` argument)
            self.rotary_emb_first = LlamaRotaryEmbedding(config=self.config.config_8b)
            self.rotary_emb_last = LlamaRotaryEmbedding(config=self.config.config_70b)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Run the split model.

        With ``output_hidden_states``, ``hidden_states`` holds ``N + M + 2`` tensors: the
        embeddings, the output of each small-donor layer, the adapter output, and the output of
        each large-donor layer, the last one after the final norm (as transformers' LLaMA does).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        self._sync_attn_implementation()
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        all_hidden: list[torch.Tensor] = []
        hidden = inputs_embeds

        def run(layers: nn.ModuleList, rotary: LlamaRotaryEmbedding, hidden: torch.Tensor) -> torch.Tensor:
            position_embeddings = rotary(hidden, position_ids=position_ids)
            for layer in layers:
                if output_hidden_states:
                    all_hidden.append(hidden)
                hidden = layer(
                    hidden,
                    attention_mask=causal_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
            return hidden

        hidden = run(self.layers_first, self.rotary_emb_first, hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        hidden = self.adapter(hidden)
        hidden = run(self.layers_last, self.rotary_emb_last, hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )


class CustomSplitLLamaForCausalLM(CustomSplitLLamaPreTrainedModel, GenerationMixin):
    """Split model with the large donor's LM head: logits, loss and ``generate``."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: SplitLlamaConfig) -> None:
        super().__init__(config)
        self.model = CustomSplitLLamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size_70, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


@dataclass
class SplitLlamaValueOutput(ModelOutput):
    """Output of :class:`CustomSplitLLamaForValue`: one scalar per token, as ``values`` ``(batch, seq)``
    and as ``logits`` ``(batch, seq, 1)`` (what ``AutoModelForTokenClassification`` users read: veRL's critic)."""

    values: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class CustomSplitLLamaForValue(CustomSplitLLamaPreTrainedModel):
    """A critic: the split model with a scalar value head on the last hidden state of each token.

    Registered for ``AutoModelForTokenClassification`` (veRL loads critics so); the head has one
    output whatever ``config.num_labels`` says.

    Loaded from a causal-LM checkpoint (which has no ``value_head``), the head starts at zero,
    a logged, deterministic initialisation; the LM head is dropped.
    """

    _initialised_if_missing = ("value_head.",)
    _ignored_if_unexpected = ("lm_head.",)

    def __init__(self, config: SplitLlamaConfig) -> None:
        super().__init__(config)
        self.model = CustomSplitLLamaModel(config)
        self.value_head = nn.Linear(config.hidden_size_70, 1, bias=True)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "value_head", None):
            logger.info("value_head initialised to zeros")
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> SplitLlamaValueOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.value_head(outputs.last_hidden_state)
        return SplitLlamaValueOutput(
            values=logits.squeeze(-1),
            logits=logits,
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "CustomSplitLLamaForCausalLM",
    "CustomSplitLLamaForValue",
    "CustomSplitLLamaModel",
    "CustomSplitLLamaPreTrainedModel",
    "SplitLlamaAdapter",
    "SplitLlamaValueOutput",
]
