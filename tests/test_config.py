"""SplitLlamaConfig: layer selection, adapter options, and one clear error per invalid value."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

import splitllama  # noqa: F401  (registers the config)
from splitllama import SplitConfigError, SplitLlamaConfig
from tests.donors import llama_config
from splitllama.weight_map import global_layer_index, parse_split_name, plan_weights

from .conftest import LARGE, SMALL


def make(**kw: object) -> SplitLlamaConfig:
    return SplitLlamaConfig(config_8b=llama_config(**SMALL), config_70b=llama_config(**LARGE), **kw)


def test_default_selection_first_small_last_large() -> None:
    cfg = make(num_layers_8=2, num_layers_70=3)
    assert cfg.layers_8 == [0, 1]
    assert cfg.layers_70 == [5, 6, 7]
    assert cfg.num_hidden_layers == 5 and cfg.hidden_size == 128 and cfg.vocab_size == 256
    assert cfg.adapter == "linear" and cfg.mlp is False
    assert cfg.architectures == ["CustomSplitLLamaForCausalLM"]


def test_seed_mlp_flag_and_explicit_lists() -> None:
    cfg = make(layers_8=[0, 2, 5], layers_70=[1, 4], mlp=True)
    assert (cfg.num_layers_8, cfg.num_layers_70) == (3, 2)
    assert cfg.adapter == "mlp" and cfg.adapter_hidden_size == 128
    assert make(num_layers_8=1, num_layers_70=1, adapter="mlp").mlp is True


def test_round_trip_through_json(tmp_path) -> None:
    cfg = make(layers_8=[1, 3], num_layers_70=2, adapter="lowrank", adapter_rank=8)
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, SplitLlamaConfig)
    assert again.layers_8 == [1, 3] and again.layers_70 == [6, 7] and again.adapter_rank == 8
    assert again.config_70b.hidden_size == 128 and again.config_8b.num_hidden_layers == 6


def test_weight_plan_maps_donor_layers() -> None:
    cfg = make(layers_8=[0, 3], layers_70=[2, 7])
    plan = {p.target: p for p in plan_weights(cfg)}
    src = plan["model.layers_first.1.self_attn.q_proj.weight"]
    assert (src.donor, src.source) == ("small", "model.layers.3.self_attn.q_proj.weight")
    src = plan["model.layers_last.0.mlp.down_proj.weight"]
    assert (src.donor, src.source) == ("large", "model.layers.2.mlp.down_proj.weight")
    assert plan["lm_head.weight"].fallback is None  # an untied donor's head is its lm_head.weight, never embed_tokens
    assert len(plan) == 3 + 9 * 4
    assert global_layer_index(cfg, "first", 1) == 1 and global_layer_index(cfg, "last", 0) == 3
    assert parse_split_name("model.layers_last.1.mlp.up_proj.weight") == ("last", 1, "mlp.up_proj.weight")


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        (dict(num_layers_8=7, num_layers_70=1), "num_layers_8", "0..6"),
        (dict(num_layers_8=1, num_layers_70=-1), "num_layers_70", "0..8"),
        (dict(num_layers_8=1), "num_layers_70", "required"),
        (dict(num_layers_8=0, num_layers_70=0), "num_layers_8", "at least one layer"),
        (dict(layers_8=[0, 0], num_layers_70=1), "layers_8", "duplicate"),
        (dict(layers_8=[0, 6], num_layers_70=1), "layers_8", "out of range"),
        (dict(layers_8=[2, 1], num_layers_70=1), "layers_8", "increasing"),
        (dict(layers_8=[0, 1], num_layers_8=3, num_layers_70=1), "num_layers_8", "lists 2"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="conv"), "adapter", "linear, mlp, identity, lowrank"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="identity"), "adapter", "equal hidden sizes"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="lowrank"), "adapter_rank", "1..64"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="lowrank", adapter_rank=65), "adapter_rank", "1..64"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="linear", adapter_rank=4), "adapter_rank", "only applies"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="linear", mlp=True), "mlp", "adapter is 'linear'"),
        (dict(num_layers_8=1, num_layers_70=1, adapter="mlp", adapter_hidden_size=0), "adapter_hidden_size", ">= 1"),
        (dict(num_layers_8=1, num_layers_70=1, vocab_size=300), "vocab_size", "256"),
        (dict(num_layers_8=1, num_layers_70=1, rms_norm_eps=1e-3), "rms_norm_eps", "final norm"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str, fragment: str) -> None:
    with pytest.raises(SplitConfigError) as err:
        make(**kwargs)
    assert f"SplitLlamaConfig.{field}:" in str(err.value)
    assert fragment in str(err.value)


def test_vocab_mismatch_between_donors() -> None:
    with pytest.raises(SplitConfigError, match=r"config_70b.vocab_size: donors must share one vocabulary.*256.*300"):
        SplitLlamaConfig(config_8b=llama_config(**SMALL), config_70b=llama_config(**{**LARGE, "vocab_size": 300}), num_layers_8=1, num_layers_70=1)


def test_missing_donor_path_is_named(tmp_path) -> None:
    with pytest.raises(SplitConfigError, match=r"path70b: no config.json in donor directory"):
        SplitLlamaConfig(config_8b=llama_config(**SMALL), path70b=str(tmp_path / "nope"), num_layers_8=1, num_layers_70=1)


def test_non_llama_donor_rejected() -> None:
    with pytest.raises(SplitConfigError, match=r"config_8b: donor must be a LLaMA config"):
        SplitLlamaConfig(config_8b={"model_type": "gpt2"}, config_70b=llama_config(**LARGE), num_layers_8=1, num_layers_70=1)
