"""The HF split model against its real transformers donors: exactness, caching, padding, gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import splitllama
from splitllama import CustomSplitLLamaForCausalLM, CustomSplitLLamaForValue, build_split_model

from .conftest import VOCAB


@pytest.fixture(scope="module")
def donor_model(small_donor: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(small_donor, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def self_stitched(small_donor: Path) -> CustomSplitLLamaForCausalLM:
    """The small donor stitched with itself: its first 2 layers, identity adapter, its last 4."""
    return build_split_model(small_donor, small_donor, num_layers_8=2, num_layers_70=4, adapter="identity")


@pytest.fixture(scope="module")
def wide_split(small_donor: Path, large_donor: Path) -> CustomSplitLLamaForCausalLM:
    return build_split_model(small_donor, large_donor, num_layers_8=3, num_layers_70=3, adapter="mlp", seed=0)


def tokens(batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_self_stitch_reproduces_donor_logits(small_donor: Path, donor_model: LlamaForCausalLM, attn: str) -> None:
    model = build_split_model(small_donor, small_donor, 2, 4, adapter="identity", attn_implementation=attn)
    x = tokens()
    diff = (model(x).logits - donor_model(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_self_stitch_after_save_and_auto_load(tmp_path: Path, self_stitched, donor_model) -> None:
    self_stitched.save_pretrained(tmp_path)
    assert (tmp_path / "configuration_split_llama.py").is_file() and (tmp_path / "modeling_split_llama.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, CustomSplitLLamaForCausalLM)
    x = tokens(seed=1)
    assert (loaded(x).logits - donor_model(x).logits).abs().max().item() <= 1e-5


def test_saved_model_loads_with_remote_code_without_the_package(tmp_path: Path, self_stitched, donor_model) -> None:
    """A machine without splitllama loads the saved model through trust_remote_code=True."""
    self_stitched.save_pretrained(tmp_path / "m")
    x = tokens(seed=2)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['splitllama'] = None  # the package is not importable here\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'y.pt')!r})\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, capture_output=True)
    logits = torch.load(tmp_path / "y.pt")
    assert (logits - donor_model(x).logits).abs().max().item() <= 1e-5


def test_greedy_generation_with_and_without_cache(wide_split) -> None:
    x = tokens(batch=3, length=7, seed=3)
    mask = torch.ones_like(x)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    with_cache = wide_split.generate(x, use_cache=True, **kw)
    without = wide_split.generate(x, use_cache=False, **kw)
    assert with_cache.shape == (3, 19)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_matches_each_prompt_alone(wide_split) -> None:
    prompts = [tokens(1, n, seed=10 + n)[0] for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = wide_split.generate(batch, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = wide_split.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[:, len(p):]
        assert torch.equal(together[i], alone[0]), i


def test_different_widths_forward_backward_and_checkpointing(small_donor: Path, large_donor: Path) -> None:
    x = tokens(batch=2, length=16, seed=4)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build_split_model(small_donor, large_donor, 3, 2, adapter="linear", seed=0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(x, labels=x)
        assert out.logits.shape == (2, 16, VOCAB) and torch.isfinite(out.loss)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt)
    assert "model.adapter.adapter_linear_1.weight" in plain and "model.layers_first.0.mlp.up_proj.weight" in plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_donors_with_different_head_dim_and_kv_heads(small_donor: Path, odd_donor: Path) -> None:
    model = build_split_model(odd_donor, small_donor, 2, 3, adapter="linear")
    assert not model.config.same_kv_cache_shape
    x = tokens(batch=2, length=6, seed=5)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False))


def test_hidden_states_output(wide_split) -> None:
    out = wide_split(tokens(length=5), output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 3 + 3 + 2  # embeddings, 3 small layers, adapter output, 3 large layers (last normed)
    assert hs[0].shape[-1] == 64 and hs[3].shape[-1] == 64 and hs[4].shape[-1] == 128 and hs[-1].shape[-1] == 128


def test_value_model(tmp_path: Path, small_donor: Path, large_donor: Path, wide_split) -> None:
    wide_split.save_pretrained(tmp_path / "lm")
    critic = CustomSplitLLamaForValue.from_pretrained(tmp_path / "lm")  # no value_head saved: zero init (logged)
    x = tokens(length=9, seed=6)
    values = critic(x).values
    assert values.shape == (2, 9) and torch.count_nonzero(values) == 0
    with torch.no_grad():
        critic.value_head.weight.normal_()
    torch.testing.assert_close(
        critic(x).values, critic.value_head(wide_split(x, output_hidden_states=True).hidden_states[-1]).squeeze(-1)
    )
    critic.save_pretrained(tmp_path / "critic")
    again = CustomSplitLLamaForValue.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(again(x).values, critic(x).values)
    built = build_split_model(small_donor, large_donor, 3, 3, adapter="mlp", model_class=CustomSplitLLamaForValue)
    assert built(x).values.shape == (2, 9)


def test_missing_parameter_in_saved_model_is_an_error(tmp_path: Path, wide_split) -> None:
    from safetensors.torch import load_file, save_file

    wide_split.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers_last.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 parameter.*layers_last.1.mlp.up_proj.weight.*refusing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_auto_classes_are_registered() -> None:
    from transformers import AutoConfig, AutoModel

    cfg_cls = AutoConfig.for_model("custom_split_llama").__class__
    assert cfg_cls is splitllama.SplitLlamaConfig
    assert AutoModel._model_mapping[splitllama.SplitLlamaConfig] is splitllama.CustomSplitLLamaModel
