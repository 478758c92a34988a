"""The one configuration class of a split LLaMA model, shared by every backend.

A split model runs the embeddings and the selected layers of a *small* LLaMA donor, an adapter
from the small hidden size to the large one, then the selected layers, final norm and LM head of
a *large* LLaMA donor. This config keeps the field names of the original design note
(``path8b``, ``path70b``, ``num_layers_8``, ``num_layers_70``, ``mlp``) and holds both donor
configs (``config_8b``, ``config_70b``), so a saved split model loads without its donors.

Layer selection lives here and nowhere else: :attr:`layers_8` and :attr:`layers_70` are the donor
layer indices, resolved on construction (default: the first ``num_layers_8`` layers of the small
donor and the last ``num_layers_70`` of the large one). Every backend reads them.

This module imports only ``transformers`` so that it can be copied next to a saved checkpoint
and loaded with ``trust_remote_code=True`` on a machine without ``splitllama``.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PreTrainedConfig

SPLIT_ARCHITECTURE = "CustomSplitLLamaForCausalLM"
ADAPTER_TYPES = ("linear", "mlp", "identity", "lowrank")


class SplitConfigError(ValueError):
    """A split-model configuration value is invalid; the message names the field."""


def field_error(field: str, message: str) -> SplitConfigError:
    """The error of one split-config field, worded ``SplitLlamaConfig.<field>: <message>`` (run.py maps it to the override)."""
    return SplitConfigError(f"SplitLlamaConfig.{field}: {message}")


def _load_donor_config(path: str, field: str) -> LlamaConfig:
    """Read a donor's ``config.json`` (config only, no weights)."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        raise field_error(field, f"no config.json in donor directory {path!r}; a donor is a Hugging Face LLaMA checkpoint "
                                 "directory (config.json, tokenizer and *.safetensors; `hf download <model> --local-dir <dir>` "
                                 "writes one): give that directory")
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as exc:
        raise field_error(field, f"cannot read donor config {config_file}: {exc}") from exc
    if model_type != "llama":
        raise field_error(field, f"{config_file} declares model_type {model_type!r}: not a LLaMA checkpoint "
                                  "(a donor must have model_type 'llama'); give the directory of a LLaMA-family checkpoint")
    try:
        config = LlamaConfig.from_pretrained(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the field named
        raise field_error(field, f"cannot read donor config {config_file}: {exc}") from exc
    return config


def _as_llama_config(value: Any, field: str) -> LlamaConfig | None:
    if value is None or isinstance(value, LlamaConfig):
        return value
    if isinstance(value, PreTrainedConfig):
        if getattr(value, "model_type", None) != "llama":
            raise field_error(field, f"donor must be a LLaMA config (model_type 'llama'), got {value.model_type!r}")
        return LlamaConfig(**value.to_dict())
    if isinstance(value, dict):
        model_type = value.get("model_type", "llama")
        if model_type != "llama":
            raise field_error(field, f"donor must be a LLaMA config (model_type 'llama'), got {model_type!r}")
        return LlamaConfig(**{k: v for k, v in value.items() if k != "model_type"})
    raise field_error(field, f"expected a LlamaConfig or a dict, got {type(value).__name__}")


def resolve_layer_indices(
    explicit: list[int] | None, count: int | None, total: int, *, take_last: bool, list_field: str, count_field: str
) -> list[int]:
    """Resolve one donor's selected layers from an explicit list or a count.

    The default selection is the first ``count`` layers (small donor) or the last ``count``
    layers (large donor, ``take_last=True``). Explicit lists may be non-contiguous but must be
    strictly increasing, in range, and agree with ``count`` when both are given.
    """
    if explicit is not None:
        indices = list(explicit)
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise field_error(list_field, f"layer indices must be integers, got {i!r}")
            if not 0 <= i < total:
                raise field_error(list_field, f"layer index {i} out of range: the donor has layers 0..{total - 1}")
        if len(set(indices)) != len(indices):
            dupes = sorted({i for i in indices if indices.count(i) > 1})
            raise field_error(list_field, f"duplicate layer indices {dupes}")
        if indices != sorted(indices):
            raise field_error(list_field, f"layer indices must be in increasing order, got {indices}")
        if count is not None and count != len(indices):
            raise field_error(
                count_field, f"is {count} but {list_field} lists {len(indices)} layers; give one or make them agree"
            )
        return indices
    if count is None:
        raise field_error(count_field, f"required (an integer in 0..{total}) unless {list_field} is given")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
        raise field_error(count_field, f"must be an integer in 0..{total} (the donor's layer count), got {count!r}")
    return list(range(total - count, total)) if take_last else list(range(count))


def llama_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    max_position_embeddings: int = 512,
    rope_theta: float = 500000.0,
    tie_word_embeddings: bool = False,
    rms_norm_eps: float = 1e-5,
) -> LlamaConfig:
    """A Llama-3-like config at toy size (GQA, RoPE theta 500000, RMSNorm eps 1e-5)."""
    return LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_attention_heads,
        intermediate_size=intermediate_size if intermediate_size is not None else int(hidden_size * 3.5) // 8 * 8,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@strict(accept_kwargs=True)
class SplitLlamaConfig(PreTrainedConfig):
    r"""Configuration of a split LLaMA: small-donor layers, adapter, large-donor layers.

    Args:
        path8b / path70b: directories of the small and large donor checkpoints. Needed to
            assemble weights; a saved split model no longer needs them.
        num_layers_8 / num_layers_70: how many layers to take from each donor.
        layers_8 / layers_70: explicit donor layer indices (increasing, possibly
            non-contiguous). Default: first ``num_layers_8`` of the small donor, last
            ``num_layers_70`` of the large one.
        mlp: seed-compatible switch for the MLP adapter (``adapter="mlp"``).
        adapter: ``linear`` | ``mlp`` (linear-ReLU-linear) | ``identity`` (equal hidden sizes)
            | ``lowrank`` (two linears through ``adapter_rank``, no activation).
        adapter_hidden_size: inner width of the MLP adapter (default: the large hidden size).
        adapter_rank: rank of the low-rank adapter.
        adapter_bias: whether the adapter's linears have a bias.
        config_8b / config_70b: the donor ``LlamaConfig``s (read from the paths if absent).
        assemble_from_donors: set in a seed-style directory (a ``config.json`` without weights):
            ``from_pretrained`` then assembles the model from ``path8b`` / ``path70b``. Saved
            models write ``false``; a directory is never taken for seed-style because its weights
            file is missing.
    """

    model_type: ClassVar[str] = "custom_split_llama"
    sub_configs: ClassVar[dict[str, type[PreTrainedConfig]]] = {"config_8b": LlamaConfig, "config_70b": LlamaConfig}
    has_no_defaults_at_init: ClassVar[bool] = True
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    path8b: str | None = None
    path70b: str | None = None
    num_layers_8: int | None = None
    num_layers_70: int | None = None
    layers_8: list[int] | None = None
    layers_70: list[int] | None = None
    mlp: bool = False
    adapter: str | None = None
    adapter_hidden_size: int | None = None
    adapter_rank: int | None = None
    adapter_bias: bool = True
    config_8b: dict | PreTrainedConfig | None = None
    config_70b: dict | PreTrainedConfig | None = None
    assemble_from_donors: bool = False
    # Derived from the donors on construction (mirrors of the large donor, for tools that read
    # the top level, such as vLLM's cache sizing); a conflicting vocab_size or rms_norm_eps is an error.
    vocab_size: int | None = None
    rms_norm_eps: float | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.architectures is None:
            self.architectures = [SPLIT_ARCHITECTURE]
        self.config_8b = _as_llama_config(self.config_8b, "config_8b")
        self.config_70b = _as_llama_config(self.config_70b, "config_70b")
        if self.config_8b is None and self.path8b is not None:
            self.config_8b = _load_donor_config(self.path8b, "path8b")
        if self.config_70b is None and self.path70b is not None:
            self.config_70b = _load_donor_config(self.path70b, "path70b")
        # PreTrainedConfig's own __post_init__ sets attention implementation, dtype and so on.
        super().__post_init__(**kwargs)
        if self.config_8b is None and self.config_70b is None and self.num_layers_8 is None:
            return  # an empty config (transformers builds one to diff against); nothing to check
        self._resolve_and_validate()

    # ------------------------------------------------------------------ validation
    def _resolve_and_validate(self) -> None:
        small, large = self.config_8b, self.config_70b
        if small is None:
            raise field_error("config_8b", "small donor unknown: give path8b (a donor directory) or config_8b")
        if large is None:
            raise field_error("config_70b", "large donor unknown: give path70b (a donor directory) or config_70b")
        if small.vocab_size != large.vocab_size:
            raise field_error(
                "config_70b.vocab_size",
                f"donors must share one vocabulary, but the small donor has {small.vocab_size} tokens "
                f"and the large donor {large.vocab_size}",
            )
        if self.vocab_size is not None and self.vocab_size != large.vocab_size:
            raise field_error("vocab_size", f"is {self.vocab_size} but the donors have {large.vocab_size}")

        self.layers_8 = resolve_layer_indices(
            self.layers_8, self.num_layers_8, small.num_hidden_layers,
            take_last=False, list_field="layers_8", count_field="num_layers_8",
        )
        self.layers_70 = resolve_layer_indices(
            self.layers_70, self.num_layers_70, large.num_hidden_layers,
            take_last=True, list_field="layers_70", count_field="num_layers_70",
        )
        self.num_layers_8, self.num_layers_70 = len(self.layers_8), len(self.layers_70)
        if self.num_layers_8 + self.num_layers_70 == 0:
            raise field_error("num_layers_8", "a split model needs at least one layer (num_layers_8 + num_layers_70 >= 1)")

        self._validate_adapter(small.hidden_size, large.hidden_size)

        # Mirrors of the large donor at the top level.
        self.vocab_size = large.vocab_size
        if self.rms_norm_eps is not None and abs(self.rms_norm_eps - large.rms_norm_eps) > 1e-12:
            raise field_error(
                "rms_norm_eps", f"is {self.rms_norm_eps} but the large donor's final norm uses {large.rms_norm_eps}"
            )
        self.rms_norm_eps = large.rms_norm_eps
        self.hidden_size = large.hidden_size
        self.intermediate_size = large.intermediate_size
        self.num_hidden_layers = self.num_layers_8 + self.num_layers_70
        self.num_attention_heads = large.num_attention_heads
        self.num_key_value_heads = large.num_key_value_heads
        self.head_dim = large.head_dim
        self.max_position_embeddings = min(small.max_position_embeddings, large.max_position_embeddings)
        self.initializer_range = large.initializer_range
        # Token ids follow the small donor, whose tokenizer the split model uses.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(small, name))

    def _validate_adapter(self, h_small: int, h_large: int) -> None:
        if self.adapter is None:
            self.adapter = "mlp" if self.mlp else "linear"
        if self.adapter not in ADAPTER_TYPES:
            raise field_error("adapter", f"must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter!r}")
        if self.mlp and self.adapter != "mlp":
            raise field_error("mlp", f"is true but adapter is {self.adapter!r}; use adapter='mlp' (or mlp=false)")
        self.mlp = self.adapter == "mlp"
        if self.adapter == "identity" and h_small != h_large:
            raise field_error(
                "adapter",
                f"'identity' needs equal hidden sizes, but the small donor has {h_small} and the large {h_large}; "
                "use linear, mlp or lowrank",
            )
        if self.adapter == "mlp":
            if self.adapter_hidden_size is None:
                self.adapter_hidden_size = h_large
            if self.adapter_hidden_size < 1:
                raise field_error("adapter_hidden_size", f"must be >= 1, got {self.adapter_hidden_size}")
        elif self.adapter_hidden_size is not None:
            raise field_error("adapter_hidden_size", f"only applies to adapter='mlp', not {self.adapter!r}")
        if self.adapter == "lowrank":
            limit = min(h_small, h_large)
            if self.adapter_rank is None or not 1 <= self.adapter_rank <= limit:
                raise field_error("adapter_rank", f"must be an integer in 1..{limit} for adapter='lowrank', got {self.adapter_rank!r}")
        elif self.adapter_rank is not None:
            raise field_error("adapter_rank", f"only applies to adapter='lowrank', not {self.adapter!r}")

    # ------------------------------------------------------------------ derived views
    @property
    def hidden_size_8(self) -> int:
        """Hidden size of the small donor (the adapter's input)."""
        return self.config_8b.hidden_size

    @property
    def hidden_size_70(self) -> int:
        """Hidden size of the large donor (the adapter's output)."""
        return self.config_70b.hidden_size

    @property
    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of the adapter, by name relative to the adapter module."""
        h_s, h_l, bias = self.hidden_size_8, self.hidden_size_70, self.adapter_bias
        if self.adapter == "identity":
            return {}
        inner = {"linear": None, "mlp": self.adapter_hidden_size, "lowrank": self.adapter_rank}[self.adapter]
        if inner is None:
            shapes = {"adapter_linear_1.weight": (h_l, h_s)}
            if bias:
                shapes["adapter_linear_1.bias"] = (h_l,)
            return shapes
        # The low-rank adapter's first projection has no bias: the second one's absorbs it.
        shapes = {"adapter_linear_1.weight": (inner, h_s), "adapter_linear_2.weight": (h_l, inner)}
        if bias:
            if self.adapter == "mlp":
                shapes["adapter_linear_1.bias"] = (inner,)
            shapes["adapter_linear_2.bias"] = (h_l,)
        return shapes

    @property
    def same_kv_cache_shape(self) -> bool:
        """True when both donors have the same per-token KV size (head_dim and KV heads): vLLM needs it."""
        s, l = self.config_8b, self.config_70b
        return (s.head_dim, s.num_key_value_heads) == (l.head_dim, l.num_key_value_heads)

    def describe(self) -> str:
        """One line naming the layout, for logs."""
        return (
            f"split llama: small layers {self.layers_8} (h={self.hidden_size_8}) -> {self.adapter} adapter -> "
            f"large layers {self.layers_70} (h={self.hidden_size_70}), vocab {self.vocab_size}"
        )


__all__ = ["ADAPTER_TYPES", "SPLIT_ARCHITECTURE", "SplitConfigError", "SplitLlamaConfig", "llama_config", "resolve_layer_indices"]
