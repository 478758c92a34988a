"""Real donor pairs, one config away: the presets in ``conf/donors/``, tested offline.

For each preset, donors with the real ``config.json`` (the values the preset pins in
``expect8b`` / ``expect70b``) and random weights are saved as sharded safetensors, then assembled
through the code path ``run.py`` takes with that preset's overrides (compose, validate, model
spec, LightningModule, Trainer) and trained for one step.

What is shrunk, and why (memory and seconds on a CPU):

- vocabulary: 49152 / 128256 -> 512 in every preset (the embeddings and head only);
- weights: only the layers the split reads are written (``make_partial_donor``); the configs keep
  their real layer counts, so the layer indices the split takes are the real ones (3B: 26..27,
  70B: 78..79);
- SmolLM2-135M/360M and Llama-3.2-1B/3B: nothing else, every layer has its real shape;
- Llama-3.1-8B/70B and Llama-3-8B/70B: width / 4 (hidden 4096 -> 1024 and 8192 -> 2048, intermediate 14336 -> 3584
  and 28672 -> 7168, query heads 32 -> 8 and 64 -> 16, KV heads 8 -> 2): head_dim (128), the
  query/KV head ratios (4 and 8), the FFN/hidden ratios, the widths' ratio (2) and equal KV heads in
  both donors are kept. The preset's own check (``donors.expect*``) is given the shrunk values.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.donors import make_partial_donor

from tests.conftest import compose_run_config

SHRUNK_VOCAB = 512


def _published(hidden: int, layers: int, heads: int, kv: int, head_dim: int, ffn: int, vocab: int, positions: int,
               theta: float, scaling_factor: float | None, tied: bool) -> dict:
    scaling = None if scaling_factor is None else {"rope_type": "llama3", "factor": scaling_factor, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": head_dim, "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": positions,
            "rms_norm_eps": 1e-5, "rope_theta": theta, "rope_scaling": scaling, "tie_word_embeddings": tied}


#: The models' published ``config.json`` values, written out here (not read from the presets) so that a
#: wrong value in a preset fails.
PUBLISHED = {
    "HuggingFaceTB/SmolLM2-135M": _published(576, 30, 9, 3, 64, 1536, 49152, 8192, 100000.0, None, True),
    "HuggingFaceTB/SmolLM2-360M": _published(960, 32, 15, 5, 64, 2560, 49152, 8192, 100000.0, None, True),
    "meta-llama/Llama-3.2-1B": _published(2048, 16, 32, 8, 64, 8192, 128256, 131072, 500000.0, 32.0, True),
    "meta-llama/Llama-3.2-3B": _published(3072, 28, 24, 8, 128, 8192, 128256, 131072, 500000.0, 32.0, True),
    "meta-llama/Llama-3.1-8B": _published(4096, 32, 32, 8, 128, 14336, 128256, 131072, 500000.0, 8.0, False),
    "meta-llama/Llama-3.1-70B": _published(8192, 80, 64, 8, 128, 28672, 128256, 131072, 500000.0, 8.0, False),
    "meta-llama/Meta-Llama-3-8B": _published(4096, 32, 32, 8, 128, 14336, 128256, 8192, 500000.0, None, False),
    "meta-llama/Meta-Llama-3-70B": _published(8192, 80, 64, 8, 128, 28672, 128256, 8192, 500000.0, None, False),
}


def _shrink(expect: dict, preset: str) -> dict:
    """The preset's real config with the documented reductions (see the module docstring)."""
    shrunk = {**expect, "vocab_size": SHRUNK_VOCAB}
    if preset in ("llama31_8b_70b", "llama3_8b_70b"):
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            shrunk[key] = expect[key] // 4
    return shrunk


PRESETS = {
    # preset: (layers.n8, layers.n70) the test assembles and trains; the preset's default split is
    # validated against the real configs (config.json only) in the same test
    "smollm2_135m_360m": (2, 2),
    "llama32_1b_3b": (1, 1),  # a Llama-3.2-3B layer alone is 100M parameters
    "llama31_8b_70b": (2, 2),
    "llama3_8b_70b": (1, 1),  # Llama 3 (no rope scaling, 8192 positions): the same shapes as 3.1
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_pins_the_published_configs(preset: str) -> None:
    """Each preset's ``expect8b`` / ``expect70b`` (what the donors' config.json is checked against) and its
    default split are the published models' numbers."""
    from omegaconf import OmegaConf

    donors = compose_run_config(f"donors={preset}").donors
    for key, hub in (("expect8b", donors.hub8b), ("expect70b", donors.hub70b)):
        assert OmegaConf.to_container(donors[key]) == PUBLISHED[hub], (preset, key, hub)
    assert donors.default_n8 < PUBLISHED[donors.hub8b]["num_hidden_layers"]
    assert donors.default_n70 < PUBLISHED[donors.hub70b]["num_hidden_layers"]


def _overrides(name: str, real: dict, shrunk: dict) -> list[str]:
    """``donors.expect*`` overrides that tell the preset's check about the shrunk values."""
    return [f"donors.{name}.{k}={v}" for k, v in shrunk.items() if real[k] != v and k != "rope_scaling"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_assembles_real_layouts_and_trains_one_step(preset: str, tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from splitllama.checkpoint import LazyCheckpoint
    from splitllama.run.checks import EXPECTED_DONOR_FIELDS, validate
    from splitllama.run.donors import resolve_donors
    from splitllama.run.model import make_module, model_spec
    from splitllama.run.trainer import make_trainer
    from splitllama.training.data import BlockDataset

    base = compose_run_config(f"donors={preset}")
    real = {k: OmegaConf.to_container(base.donors[f"expect{k}"]) for k in ("8b", "70b")}
    shrunk = {k: _shrink(real[k], preset) for k in real}
    configs = {k: LlamaConfig(**shrunk[k]) for k in shrunk}
    n8, n70 = PRESETS[preset]
    small = make_partial_donor(tmp_path / "small", configs["8b"], list(range(n8)), seed=1)
    large_layers = list(range(configs["70b"].num_hidden_layers - n70, configs["70b"].num_hidden_layers))
    large = make_partial_donor(tmp_path / "large", configs["70b"], large_layers, seed=2)
    assert len(list(large.glob("*.safetensors"))) == n70 + 1  # sharded: one file per layer + embeddings/norm/head

    overrides = [f"donors={preset}", f"donors.path8b={small}", f"donors.path70b={large}",
                 *_overrides("expect8b", real["8b"], shrunk["8b"]), *_overrides("expect70b", real["70b"], shrunk["70b"]),
                 "logger=none", "eval.references=false", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                 "parallel.accelerator=cpu", "data.batch_size=2", f"paths.output_dir={tmp_path / 'run'}",
                 "adapter.init=random",  # random weights: no least-squares stitch to fit (and no calibration data here)
                 "finetune=adapter"]  # one step moves only the adapter: the donors' layers are checked unchanged below
    # the preset's default split fits the real layer counts (validation reads config.json only)
    default = validate(compose_run_config(*overrides))
    assert (default.num_layers_8, default.num_layers_70) == (base.donors.default_n8, base.donors.default_n70)
    assert list(default.layers_70)[-1] == real["70b"]["num_hidden_layers"] - 1
    cfg = compose_run_config(*overrides, f"layers.n8={n8}", f"layers.n70={n70}")
    split = validate(cfg)  # the preset's config.json check passes: these are its (documented) configs
    assert (split.num_layers_8, split.num_layers_70, list(split.layers_70)) == (n8, n70, large_layers)
    for key, donor in (("8b", split.config_8b), ("70b", split.config_70b)):
        for field in EXPECTED_DONOR_FIELDS:  # rope theta and scaling carried into the split config
            assert getattr(donor, field) == getattr(configs[key], field), (key, field)
    # Llama 3.1 / 3.2: llama3 rope scaling; Llama 3 and SmolLM2: none
    rope_type = "llama3" if PUBLISHED[base.donors.hub70b]["rope_scaling"] else "default"
    assert split.config_70b.rope_parameters["rope_type"] == rope_type

    module = make_module(cfg, model_spec(cfg, resolve_donors(cfg)), teacher_path=None)
    trainer = make_trainer(cfg, [], [])
    blocks = torch.randint(0, SHRUNK_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    module.configure_model()
    model = module.model
    adapter_before = model.model.adapter.adapter_linear_1.weight.detach().clone()
    layer_before = model.model.layers_last[0].mlp.down_proj.weight.detach().clone()
    trainer.fit(module, train_dataloaders=DataLoader(BlockDataset(blocks), batch_size=2))
    assert trainer.global_step == 1 and math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert not torch.equal(model.model.adapter.adapter_linear_1.weight, adapter_before)  # the adapter trained
    assert torch.equal(model.model.layers_last[0].mlp.down_proj.weight, layer_before)  # the donors stayed frozen

    # shapes and head layouts as in the real models
    small_cfg, large_cfg = configs["8b"], configs["70b"]
    first, last = model.model.layers_first[0].self_attn, model.model.layers_last[-1].self_attn
    assert first.q_proj.weight.shape == (small_cfg.num_attention_heads * small_cfg.head_dim, small_cfg.hidden_size)
    assert first.k_proj.weight.shape == (small_cfg.num_key_value_heads * small_cfg.head_dim, small_cfg.hidden_size)
    assert last.q_proj.weight.shape == (large_cfg.num_attention_heads * large_cfg.head_dim, large_cfg.hidden_size)
    assert last.v_proj.weight.shape == (large_cfg.num_key_value_heads * large_cfg.head_dim, large_cfg.hidden_size)
    assert model.model.layers_last[-1].mlp.gate_proj.weight.shape == (large_cfg.intermediate_size, large_cfg.hidden_size)
    assert model.model.adapter.adapter_linear_1.weight.shape == (large_cfg.hidden_size, small_cfg.hidden_size)
    assert model.model.embed_tokens.weight.shape == (SHRUNK_VOCAB, small_cfg.hidden_size)
    assert model.lm_head.weight.shape == (SHRUNK_VOCAB, large_cfg.hidden_size)
    # the head: the large donor's lm_head, or its embed_tokens when it ties them (SmolLM2, Llama 3.2)
    large_ckpt = LazyCheckpoint(large)
    assert ("lm_head.weight" in large_ckpt) == (not large_cfg.tie_word_embeddings)
    head_source = "model.embed_tokens.weight" if large_cfg.tie_word_embeddings else "lm_head.weight"
    assert torch.equal(model.lm_head.weight, large_ckpt.get(head_source).float())
    assert torch.equal(model.model.embed_tokens.weight, LazyCheckpoint(small).get("model.embed_tokens.weight").float())
    # each part runs its own donor's rotary embedding (Llama 3.x: llama3 scaling)
    for rotary, donor_cfg in ((model.model.rotary_emb_first, small_cfg), (model.model.rotary_emb_last, large_cfg)):
        reference = LlamaRotaryEmbedding(config=donor_cfg)
        assert rotary.rope_type == reference.rope_type and torch.allclose(rotary.inv_freq, reference.inv_freq)


def test_a_checkpoint_that_does_not_match_the_preset_fails_naming_the_field(tmp_path: Path) -> None:
    """Donors swapped: the check reads config.json only and names the key, the values and the way out."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    from splitllama.run.checks import validate
    from splitllama.errors import RunConfigError

    base = compose_run_config("donors=smollm2_135m_360m")
    small, large = (LlamaConfig(**OmegaConf.to_container(base.donors[k])) for k in ("expect8b", "expect70b"))
    for directory, config in ((tmp_path / "small", small), (tmp_path / "large", large)):
        config.save_pretrained(directory)  # the check needs no weights
    with pytest.raises(RunConfigError, match=r"donors\.path8b=.*large: its config\.json has hidden_size=960, but "
                                            r"donors=smollm2_135m_360m expects hidden_size=576 \(HuggingFaceTB/SmolLM2-135M\)"):
        validate(compose_run_config("donors=smollm2_135m_360m", f"donors.path8b={tmp_path / 'large'}",
                                      f"donors.path70b={tmp_path / 'small'}"))
    with pytest.raises(RunConfigError, match=r"donors\.path8b=\?\?\?.*hf download HuggingFaceTB/SmolLM2-135M"):
        validate(compose_run_config("donors=smollm2_135m_360m"))
