"""Assemble a split model from two ordinary Hugging Face LLaMA checkpoints.

The model is created on the meta device (no random weights are allocated), then every parameter
is filled from exactly one place: a donor tensor named by :mod:`splitllama.weight_map`, the
adapter checkpoint, or a named, logged adapter initialisation. Before a single tensor byte is
read, the whole plan is checked against the donors' safetensors headers (missing tensors, wrong
shapes), so a bad checkpoint fails in milliseconds with a message listing what is wrong.

Only the needed tensors are read, one at a time, from single-file or sharded safetensors: peak
memory is the split model plus one tensor, whatever the size of the large donor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from .checkpoint import CheckpointError, LazyCheckpoint, check_model_dir, load_adapter_state
from .configuration_split_llama import SplitLlamaConfig, field_error
from .dtypes import resolve_dtype
from .modeling_split_llama import CustomSplitLLamaForCausalLM, CustomSplitLLamaModel, CustomSplitLLamaPreTrainedModel
from .weight_map import ADAPTER_PREFIX, TensorSource, adapter_tensor_names, plan_weights

logger = logging.getLogger(__name__)

ADAPTER_INITS = ("random", "identity", "lstsq")
ADAPTER_FILES = ("adapter.safetensors", "adapter.pt")
READ_THREADS = 4

Calibration = Sequence[str] | torch.Tensor
LLAMA_EMBEDDING = "model.embed_tokens.weight"
#: Donor tensors are cast to the model's dtype when read: only floating-point ones mean the same after the cast.
DONOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def build_split_model(
    path8b: str | os.PathLike[str],
    path70b: str | os.PathLike[str],
    num_layers_8: int | None = None,
    num_layers_70: int | None = None,
    adapter: str = "linear",
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    *,
    layers_8: list[int] | None = None,
    layers_70: list[int] | None = None,
    adapter_init: str | None = None,
    adapter_hidden_size: int | None = None,
    adapter_rank: int | None = None,
    adapter_bias: bool = True,
    calibration: Calibration | None = None,
    calibration_seq_len: int = 256,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    model_class: type[CustomSplitLLamaPreTrainedModel] = CustomSplitLLamaForCausalLM,
) -> CustomSplitLLamaPreTrainedModel:
    """Build a split model: the first layers of ``path8b``, an adapter, the last layers of ``path70b``.

    Args:
        path8b, path70b: donor directories (``config.json`` + single-file or sharded safetensors).
        num_layers_8, num_layers_70: how many layers to take (first of the small donor, last of
            the large one); or give ``layers_8`` / ``layers_70`` as explicit index lists.
        adapter: ``linear`` | ``mlp`` | ``identity`` | ``lowrank`` (with ``adapter_rank``).
        adapter_checkpoint: trained adapter weights (``.safetensors``, or ``.pt`` read with
            ``weights_only=True``). Without it the adapter is initialised by ``adapter_init``.
        adapter_init: ``random`` (default for linear/mlp/lowrank), ``identity`` (eye, padded or
            truncated) or ``lstsq`` (least-squares stitching fitted on ``calibration``).
        calibration: texts (tokenised with the small donor's tokenizer) or a LongTensor of token
            ids ``(batch, seq)`` for ``lstsq``.
        dtype, device: of the assembled model. ``seed`` seeds the random adapter initialisation.
        model_class: :class:`CustomSplitLLamaForCausalLM` or :class:`CustomSplitLLamaForValue`.
    """
    config = SplitLlamaConfig(
        path8b=os.fspath(path8b),
        path70b=os.fspath(path70b),
        num_layers_8=num_layers_8,
        num_layers_70=num_layers_70,
        layers_8=layers_8,
        layers_70=layers_70,
        adapter=adapter,
        adapter_hidden_size=adapter_hidden_size,
        adapter_rank=adapter_rank,
        adapter_bias=adapter_bias,
    )
    return assemble(
        config,
        adapter_checkpoint=adapter_checkpoint,
        adapter_init=adapter_init,
        calibration=calibration,
        calibration_seq_len=calibration_seq_len,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        seed=seed,
        model_class=model_class,
    )


def _resolve_adapter_init(config: SplitLlamaConfig, adapter_init: str | None, has_checkpoint: bool) -> str | None:
    if has_checkpoint:
        if adapter_init is not None:
            raise ValueError("adapter_init: give either adapter_checkpoint or adapter_init, not both")
        return None
    if config.adapter == "identity":
        return None  # no parameters
    init = adapter_init or "random"
    if init not in ADAPTER_INITS:
        raise ValueError(f"adapter_init: must be one of {', '.join(ADAPTER_INITS)}, got {init!r}")
    return init


def donor_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA checkpoint of ``config`` holds, with its shape: transformers' own ``LlamaForCausalLM``
    built on the meta device with one layer (nothing allocated), its layer renumbered ``num_hidden_layers``
    times. ``lm_head.weight`` is listed whether or not the head is tied."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        template = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1}))
    shapes: dict[str, tuple[int, ...]] = {"lm_head.weight": (config.vocab_size, config.hidden_size)}
    for name, tensor in template.state_dict().items():
        if ".layers.0." not in name:
            shapes[name] = tuple(tensor.shape)
            continue
        for index in range(config.num_hidden_layers):
            shapes[name.replace(".layers.0.", f".layers.{index}.")] = tuple(tensor.shape)
    return shapes


def donor_layout_problems(ckpt: LazyCheckpoint, config: LlamaConfig) -> list[str]:
    """Where a donor's ``config.json`` and the tensors present disagree (none read): a tensor of a layer the config
    does not have (its ``num_hidden_layers`` would pick the wrong last layers), a tensor a LLaMA of that config has
    not (a fused or biased projection, another model's weights), a tensor of another shape than the config gives
    (``vocab_size``, ``intermediate_size``, heads...). Layers the checkpoint lacks are left to the plan: a split
    reads only its own."""
    import re

    expected = donor_tensor_shapes(config)
    config_file = ckpt.path / "config.json"
    problems = []
    layers = sorted({int(m.group(1)) for n in ckpt.names() if (m := re.match(r"model\.layers\.(\d+)\.", n))})
    beyond = [i for i in layers if i >= config.num_hidden_layers]
    if beyond:
        problems.append(f"{ckpt.role}: {config_file} has num_hidden_layers={config.num_hidden_layers}, but the tensors hold "
                        f"layers {beyond[:8]}{' ...' if len(beyond) > 8 else ''} too")
    unknown = sorted(n for n in ckpt.names() if n not in expected and not n.endswith("rotary_emb.inv_freq")
                     and not (re.match(r"model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= config.num_hidden_layers))
    if unknown:
        problems.append(f"{ckpt.role}: {len(unknown)} tensor(s) that a LLaMA of {config_file} does not have: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}")
    for name in sorted(n for n in ckpt.names() if n in expected and ckpt.shape(n) != expected[n]):
        problems.append(f"{ckpt.role}: tensor {name!r} has shape {list(ckpt.shape(name))}, but {config_file} gives "
                        f"{list(expected[name])}")
    return problems


def check_plan(
    config: SplitLlamaConfig,
    small: LazyCheckpoint,
    large: LazyCheckpoint,
    expected: dict[str, tuple[int, ...]],
    adapter_state: dict[str, torch.Tensor] | None,
) -> list[tuple[TensorSource, str]]:
    """Resolve every planned tensor against the donors' headers; raise one error listing all faults.

    Returns ``(source, donor name to read)`` pairs for the parameters ``expected`` holds.
    """
    problems: list[str] = []
    resolved: list[tuple[TensorSource, str]] = []
    not_llama = set()
    for ckpt in (small, large):
        if LLAMA_EMBEDDING not in ckpt and not any(n.startswith("model.layers.") for n in ckpt.names()):
            not_llama.add(ckpt.role)
            problems.append(f"{ckpt.role}: {ckpt.path} is not a LLaMA checkpoint: no {LLAMA_EMBEDDING!r} or 'model.layers.*' "
                            f"tensors (it holds e.g. {sorted(ckpt.names())[:3]})")
        else:
            problems.extend(donor_layout_problems(ckpt, config.config_8b if ckpt is small else config.config_70b))
    for src in plan_weights(config):
        if src.target not in expected:
            continue  # e.g. lm_head of a value model
        ckpt = small if src.donor == "small" else large
        if ckpt.role in not_llama:
            continue
        name = src.source
        if name not in ckpt:
            if src.fallback and src.fallback in ckpt:
                name = src.fallback
            else:
                untied = ""
                if src.target == "lm_head.weight" and LLAMA_EMBEDDING in ckpt:
                    untied = " (its config.json has tie_word_embeddings=false, so embed_tokens is not its head)"
                problems.append(f"missing tensor {src.source!r} in {ckpt.role} ({ckpt.path}){untied}")
                continue
        shape = ckpt.shape(name)
        if shape != tuple(expected[src.target]):
            problems.append(
                f"{ckpt.role}: tensor {name!r} has shape {list(shape)}, but {src.target} needs {list(expected[src.target])}"
            )
            continue
        if ckpt.dtype(name) not in DONOR_DTYPES:
            problems.append(
                f"{ckpt.role}: tensor {name!r} in {ckpt.shard_of(name)} is {str(ckpt.dtype(name)).removeprefix('torch.')}; "
                f"donor weights must be floating point ({', '.join(str(d).removeprefix('torch.') for d in DONOR_DTYPES)})"
            )
            continue
        resolved.append((src, name))
    adapter_expected = adapter_tensor_names(config)
    if adapter_state is not None:
        full = {ADAPTER_PREFIX + k: v for k, v in adapter_state.items()}
        for name in sorted(set(adapter_expected) - set(full)):
            problems.append(f"adapter_checkpoint: missing {name[len(ADAPTER_PREFIX):]!r} (shape {list(adapter_expected[name])})")
        for name in sorted(set(full) - set(adapter_expected)):
            problems.append(f"adapter_checkpoint: unexpected {name[len(ADAPTER_PREFIX):]!r} for a {config.adapter} adapter")
        for name in sorted(set(full) & set(adapter_expected)):
            if tuple(full[name].shape) != tuple(adapter_expected[name]):
                problems.append(
                    f"adapter_checkpoint: {name[len(ADAPTER_PREFIX):]!r} has shape {list(full[name].shape)}, "
                    f"expected {list(adapter_expected[name])}"
                )
    if problems:
        raise CheckpointError("cannot assemble the split model:\n  " + "\n  ".join(problems))
    return resolved


def assemble(
    config: SplitLlamaConfig,
    *,
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    adapter_init: str | None = None,
    calibration: Calibration | None = None,
    calibration_seq_len: int = 256,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    model_class: type[CustomSplitLLamaPreTrainedModel] = CustomSplitLLamaForCausalLM,
) -> CustomSplitLLamaPreTrainedModel:
    """Assemble ``config``'s split model from the donors at ``config.path8b`` / ``config.path70b``."""
    if config.path8b is None or config.path70b is None:
        raise field_error("path8b" if config.path8b is None else "path70b", "a donor directory is needed to assemble weights")
    dtype = resolve_dtype(dtype)
    init = _resolve_adapter_init(config, adapter_init, adapter_checkpoint is not None)
    if init == "lstsq" and calibration is None:
        raise ValueError("adapter_init: 'lstsq' needs calibration texts or token ids (calibration=...)")
    # both donors whole (config, index, tokenizer and generation JSON, every shard's header against its size)
    # before a tensor of either is read
    small = check_model_dir(config.path8b, "path8b", model_types=None)
    large = check_model_dir(config.path70b, "path70b", model_types=None)
    assert small is not None and large is not None
    adapter_state = load_adapter_state(adapter_checkpoint) if adapter_checkpoint is not None else None

    config._attn_implementation = attn_implementation
    config.dtype = dtype
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    resolved = check_plan(config, small, large, expected, adapter_state)

    from tqdm.auto import tqdm

    state: dict[str, torch.Tensor] = {}
    total = sum((small if s.donor == "small" else large).nbytes(n) for s, n in resolved)

    def read(item: tuple[TensorSource, str]) -> tuple[str, torch.Tensor, int]:
        src, name = item
        ckpt = small if src.donor == "small" else large
        return src.target, ckpt.get(name, dtype).to(device), ckpt.nbytes(name)

    # A few reads in flight overlap disk latency with page faults of the fresh tensors (file reads
    # release the GIL); memory is unchanged, since every tensor read is kept.
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading donor tensors", disable=total < 2**28) as bar, \
            ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for target, tensor, nbytes in pool.map(read, resolved):
            state[target] = tensor
            bar.update(nbytes)
    if adapter_state is not None:
        for rel, tensor in adapter_state.items():
            state[ADAPTER_PREFIX + rel] = tensor.to(dtype=dtype, device=device)
        logger.info("adapter loaded from %s", adapter_checkpoint)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    small.close()
    large.close()

    base: CustomSplitLLamaModel = model.model
    base.reset_rotary_embeddings(device)
    if adapter_state is None:
        _materialise_new_parameters(model, dtype, device)
        if init is not None:
            initialise_adapter(model, init, seed=seed, calibration=calibration, calibration_seq_len=calibration_seq_len)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:  # every parameter must come from somewhere
        raise RuntimeError(f"split model parameters not filled: {leftover}")
    model.eval()
    logger.info("%s", config.describe())
    return model


def _materialise_new_parameters(model: CustomSplitLLamaPreTrainedModel, dtype: torch.dtype, device: torch.device | str) -> None:
    """Give the adapter (and a value head) real storage; values are set by the named initialiser next."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, name, nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=device)))
    value_head = getattr(model, "value_head", None)
    if value_head is not None:
        logger.info("value_head initialised to zeros")


@torch.no_grad()
def initialise_adapter(
    model: CustomSplitLLamaPreTrainedModel,
    method: str,
    *,
    seed: int = 0,
    calibration: Calibration | None = None,
    calibration_seq_len: int = 256,
) -> None:
    """Initialise the adapter in place by ``method`` (``random`` | ``identity`` | ``lstsq``) and log it."""
    config: SplitLlamaConfig = model.config
    adapter = model.model.adapter
    linears = [m for m in (getattr(adapter, "adapter_linear_1", None), getattr(adapter, "adapter_linear_2", None)) if m is not None]
    if method == "random":
        # drawn on the CPU whatever the default device (Lightning's configure_model sets the GPU), so a
        # seed gives the same adapter on every device and backend
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for lin in linears:  # PyTorch's nn.Linear default (Kaiming-uniform), drawn from a seeded generator
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.empty(lin.weight.shape, device="cpu").uniform_(-bound, bound, generator=generator))
            if lin.bias is not None:
                lin.bias.copy_(torch.empty(lin.bias.shape, device="cpu").uniform_(-bound, bound, generator=generator))
    elif method == "identity" and config.adapter == "mlp":
        _set_linear_map(adapter, config, torch.eye(config.hidden_size_70, config.hidden_size_8), torch.zeros(config.hidden_size_70), seed=seed)
    elif method == "identity":
        for lin in linears:
            lin.weight.copy_(torch.eye(lin.out_features, lin.in_features))
            if lin.bias is not None:
                lin.bias.zero_()
    elif method == "lstsq":
        if calibration is None:
            raise ValueError("adapter_init: 'lstsq' needs calibration texts or token ids")
        weight, bias = fit_lstsq_adapter(model, calibration, seq_len=calibration_seq_len)
        _set_linear_map(adapter, config, weight, bias, seed=seed)
    else:
        raise ValueError(f"adapter_init: must be one of {', '.join(ADAPTER_INITS)}, got {method!r}")
    logger.info("adapter (%s) initialised: %s", config.adapter, method)


def _set_linear_map(adapter: nn.Module, config: SplitLlamaConfig, weight: torch.Tensor, bias: torch.Tensor, *, seed: int = 0) -> None:
    """Write the affine map ``x @ weight.T + bias`` into a linear, (truncated-SVD) low-rank or MLP adapter."""
    if config.adapter == "linear":
        adapter.adapter_linear_1.weight.copy_(weight)
        if adapter.adapter_linear_1.bias is not None:
            adapter.adapter_linear_1.bias.copy_(bias)
        return
    if config.adapter == "mlp":
        _set_mlp_map(adapter, weight, bias, seed)
        return
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    r = config.adapter_rank
    root = s[:r].sqrt()
    adapter.adapter_linear_1.weight.copy_(root[:, None] * vh[:r])
    adapter.adapter_linear_2.weight.copy_(u[:, :r] * root[None, :])
    if adapter.adapter_linear_2.bias is not None:
        adapter.adapter_linear_2.bias.copy_(bias)


def _set_mlp_map(adapter: nn.Module, weight: torch.Tensor, bias: torch.Tensor, seed: int) -> None:
    """Write ``x @ weight.T + bias`` into linear -> ReLU -> linear, exactly where the MLP is wide enough.

    ``ReLU(z) - ReLU(-z) = z``: with ``weight = U S V^T`` (rank ``k``), the first layer's units ``2i`` and
    ``2i + 1`` read ``v_i^T x`` and ``-v_i^T x`` and the second layer adds ``s_i u_i`` times their difference, so
    ``k`` directions take ``2k`` hidden units; a hidden width of at least twice the map's rank (``2 * h_s``
    always suffices) holds it exactly, a narrower one the best rank-``hidden // 2`` map (the low-rank
    adapter's). The other hidden units start as PyTorch's default draw (seeded) with zero outgoing weights:
    the map is unchanged and they still learn.
    """
    first, second = adapter.adapter_linear_1, adapter.adapter_linear_2
    hidden = first.out_features
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    k = min(hidden // 2, int((s > s[0] * 1e-12).sum()) if s.numel() else 0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / math.sqrt(first.in_features)
    w1 = torch.empty(first.weight.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    w1[0: 2 * k: 2], w1[1: 2 * k: 2] = vh[:k], -vh[:k]
    w2 = torch.zeros(second.weight.shape, dtype=torch.float64)
    w2[:, 0: 2 * k: 2], w2[:, 1: 2 * k: 2] = u[:, :k] * s[:k], -(u[:, :k] * s[:k])
    first.weight.copy_(w1)
    second.weight.copy_(w2)
    if first.bias is not None:
        first.bias.zero_()
    if second.bias is not None:
        second.bias.copy_(bias)
    if k < min(weight.shape):
        logger.warning("mlp adapter: hidden size %d holds a rank-%d part of the %dx%d least-squares map (2 x %d units "
                       "hold it exactly)", hidden, k, *weight.shape, min(weight.shape))


def _calibration_ids(calibration: Calibration, tokenizer_dir: str | None, seq_len: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32) or calibration.dim() != 2:
            raise ValueError("calibration: token ids must be an integer tensor of shape (batch, seq)")
        return calibration.long()
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        raise ValueError("calibration: texts need the small donor's tokenizer (path8b)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"calibration: cannot load a tokenizer from path8b={tokenizer_dir}: {exc}") from exc
    ids: list[int] = []
    for text in calibration:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"calibration: {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], device="cpu").view(n, seq_len)


def _run_llama_layers(
    layers: list[nn.Module], config: LlamaConfig, hidden: torch.Tensor, rotary: nn.Module
) -> torch.Tensor:
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids)
    position_embeddings = rotary(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    return hidden


@torch.no_grad()
def large_donor_hidden_states(config: SplitLlamaConfig, input_ids: torch.Tensor, before_layer: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden states of the large donor entering layer ``before_layer``, streamed layer by layer.

    Only the embeddings and one decoder layer are in memory at a time, so this works for a 70B
    donor on a machine that holds the split model.
    """
    large_cfg = config.config_70b
    large_cfg._attn_implementation = config._attn_implementation or "sdpa"
    ckpt = LazyCheckpoint(config.path70b, role="path70b")
    embed = ckpt.get("model.embed_tokens.weight", torch.float32)
    hidden = torch.nn.functional.embedding(input_ids, embed)
    del embed
    rotary = LlamaRotaryEmbedding(config=large_cfg)
    for index in range(before_layer):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(large_cfg, layer_idx=index)
        state = {name: ckpt.get(f"model.layers.{index}.{name}", torch.float32) for name, _ in layer.named_parameters()}
        layer.load_state_dict(state, assign=True)
        layer.eval()
        hidden = torch.cat([_run_llama_layers([layer], large_cfg, chunk, rotary) for chunk in hidden.split(batch_size)])
    return hidden


@torch.no_grad()
def small_split_hidden_states(model: CustomSplitLLamaPreTrainedModel, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Hidden states of the split model entering its adapter (after the last small-donor layer)."""
    base: CustomSplitLLamaModel = model.model
    base._sync_attn_implementation()
    outs = []
    for chunk in input_ids.split(batch_size):
        hidden = base.embed_tokens(chunk.to(base.embed_tokens.weight.device)).float()
        hidden = _run_llama_layers(list(base.layers_first), model.config.config_8b, hidden.to(base.embed_tokens.weight.dtype), base.rotary_emb_first)
        outs.append(hidden.float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def fit_lstsq_adapter(
    model: CustomSplitLLamaPreTrainedModel, calibration: Calibration, *, seq_len: int = 256, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares stitching: the affine map from small to large donor hidden states.

    Fits ``W, b`` minimising ``|| h_s W^T + b - h_l ||^2`` over calibration tokens, where ``h_s``
    is the small donor's hidden state after its last selected layer and ``h_l`` the large
    donor's hidden state before its first selected layer (the model-stitching baseline). A tiny
    ridge term keeps the normal equations well conditioned.
    """
    config: SplitLlamaConfig = model.config
    input_ids = _calibration_ids(calibration, config.path8b, seq_len)
    h_s = small_split_hidden_states(model, input_ids).reshape(-1, config.hidden_size_8).double()
    first_large = config.layers_70[0] if config.layers_70 else config.config_70b.num_hidden_layers
    h_l = large_donor_hidden_states(config, input_ids, first_large).reshape(-1, config.hidden_size_70).double()
    if h_s.shape[0] <= config.hidden_size_8:
        logger.warning("lstsq adapter: %d calibration tokens for %d inputs; the fit is underdetermined", h_s.shape[0], config.hidden_size_8)
    x = torch.cat([h_s, torch.ones(h_s.shape[0], 1, dtype=h_s.dtype, device=h_s.device)], dim=1)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram, x.T @ h_l)  # (h_s + 1, h_l)
    weight, bias = solution[:-1].T.contiguous(), solution[-1].contiguous()
    residual = (x @ solution - h_l).pow(2).mean() / h_l.pow(2).mean()
    logger.info("lstsq adapter fitted on %d tokens: relative residual %.4f", h_s.shape[0], residual.item())
    dtype = model.model.embed_tokens.weight.dtype
    return weight.to(dtype), bias.to(dtype)


def build_from_seed_dir(
    path: str | os.PathLike[str],
    *,
    model_class: type[CustomSplitLLamaPreTrainedModel] = CustomSplitLLamaForCausalLM,
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    adapter_init: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
    **unused: Any,
) -> CustomSplitLLamaPreTrainedModel:
    """Assemble from a seed-style directory: a ``config.json`` with ``path8b``, ``path70b``, layer counts,
    ``"assemble_from_donors": true``, and no weights.

    The adapter comes from ``adapter_checkpoint``, else from ``adapter.safetensors`` /
    ``adapter.pt`` in the directory, else from ``adapter_init`` (default ``random``, logged).
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    for field in ("path8b", "path70b"):
        if not raw.get(field):
            raise field_error(field, f"{path / 'config.json'} has no weights and no {field} to assemble from")
    config = SplitLlamaConfig.from_pretrained(os.fspath(path))
    config.assemble_from_donors = False  # the assembled model holds its weights; saving it writes a saved model
    if adapter_checkpoint is None and adapter_init is None:
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                adapter_checkpoint = path / name
                break
    if adapter_checkpoint is None and adapter_init is None and config.adapter != "identity":
        logger.warning("%s: no adapter weights found (%s); initialising the adapter 'random'", path, " or ".join(ADAPTER_FILES))
    return assemble(
        config,
        adapter_checkpoint=adapter_checkpoint,
        adapter_init=adapter_init,
        dtype=resolve_dtype(dtype) if dtype not in (None, "auto") else torch.float32,
        device=device if isinstance(device, (str, torch.device)) else "cpu",
        attn_implementation=attn_implementation or "sdpa",
        model_class=model_class,
    )


__all__ = [
    "ADAPTER_INITS",
    "assemble",
    "build_from_seed_dir",
    "build_split_model",
    "check_plan",
    "fit_lstsq_adapter",
    "initialise_adapter",
    "large_donor_hidden_states",
]
