"""build_split_model on real sharded donors: what it reads, what it refuses, how it initialises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from splitllama import CheckpointError, SplitConfigError, build_split_model
from splitllama.checkpoint import LazyCheckpoint
from tests.donors import llama_config, make_random_donor

from .conftest import LARGE, SMALL, VOCAB


def test_explicit_layer_lists_pick_exactly_those_tensors(small_donor: Path, large_donor: Path) -> None:
    model = build_split_model(small_donor, large_donor, layers_8=[0, 2, 5], layers_70=[1, 6], adapter="linear")
    small, large = LazyCheckpoint(small_donor), LazyCheckpoint(large_donor)
    state = model.state_dict()
    for split_idx, donor_idx in enumerate([0, 2, 5]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(state[f"model.layers_first.{split_idx}.{name}"], small.get(f"model.layers.{donor_idx}.{name}"))
    for split_idx, donor_idx in enumerate([1, 6]):
        for name in ("self_attn.v_proj.weight", "mlp.gate_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(state[f"model.layers_last.{split_idx}.{name}"], large.get(f"model.layers.{donor_idx}.{name}"))
    assert torch.equal(state["model.embed_tokens.weight"], small.get("model.embed_tokens.weight"))
    assert torch.equal(state["model.norm.weight"], large.get("model.norm.weight"))
    assert torch.equal(state["lm_head.weight"], large.get("lm_head.weight"))
    assert len(model.model.layers_first) == 3 and len(model.model.layers_last) == 2


def test_tied_embeddings_donor(small_donor: Path, tied_large_donor: Path) -> None:
    assert "lm_head.weight" not in LazyCheckpoint(tied_large_donor)
    model = build_split_model(small_donor, tied_large_donor, 2, 2)
    embed = LazyCheckpoint(tied_large_donor).get("model.embed_tokens.weight")
    assert torch.equal(model.lm_head.weight, embed)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_reads_into_host_memory_whatever_the_default_device(large_donor: Path) -> None:
    """Lightning's ``configure_model`` builds under the GPU as default device (found on an H200: the
    reader then made a CUDA tensor and failed to fill it); the meta device stands in for it here."""
    expected = LazyCheckpoint(large_donor).get("model.norm.weight")
    with torch.device("meta"):
        read = LazyCheckpoint(large_donor).get("model.norm.weight")
    assert read.device.type == "cpu" and torch.equal(read, expected)


def test_reads_only_needed_tensors_in_bf16(small_donor: Path, large_donor: Path) -> None:
    model = build_split_model(small_donor, large_donor, 1, 1, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_adapter_checkpoint(tmp_path: Path, small_donor: Path, large_donor: Path, suffix: str) -> None:
    weights = {"adapter.adapter_linear_1.weight": torch.randn(128, 64), "adapter.adapter_linear_1.bias": torch.randn(128)}
    path = tmp_path / f"adapter{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)
    model = build_split_model(small_donor, large_donor, 2, 2, adapter_checkpoint=path)
    assert torch.equal(model.model.adapter.adapter_linear_1.weight, weights["adapter.adapter_linear_1.weight"])
    assert torch.equal(model.model.adapter.adapter_linear_1.bias, weights["adapter.adapter_linear_1.bias"])


def test_adapter_checkpoint_faults_listed(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"adapter_linear_1.weight": torch.randn(128, 32), "adapter_linear_9.weight": torch.randn(2, 2)}, path)
    with pytest.raises(CheckpointError) as err:
        build_split_model(small_donor, large_donor, 2, 2, adapter_checkpoint=path)
    msg = str(err.value)
    assert "missing 'adapter_linear_1.bias'" in msg and "unexpected 'adapter_linear_9.weight'" in msg
    assert "'adapter_linear_1.weight' has shape [128, 32], expected [128, 64]" in msg


def test_adapter_init_identity_pads(small_donor: Path, large_donor: Path) -> None:
    model = build_split_model(small_donor, large_donor, 2, 2, adapter_init="identity")
    w = model.model.adapter.adapter_linear_1.weight
    assert torch.equal(w, torch.eye(128, 64)) and torch.count_nonzero(model.model.adapter.adapter_linear_1.bias) == 0


def test_random_adapter_init_is_seeded(small_donor: Path, large_donor: Path) -> None:
    a = build_split_model(small_donor, large_donor, 1, 1, adapter="mlp", seed=3).model.adapter.adapter_linear_2.weight
    b = build_split_model(small_donor, large_donor, 1, 1, adapter="mlp", seed=3).model.adapter.adapter_linear_2.weight
    c = build_split_model(small_donor, large_donor, 1, 1, adapter="mlp", seed=4).model.adapter.adapter_linear_2.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(adapter="mlp", adapter_init="lstsq"), "needs calibration"),
        (dict(adapter_init="lstsq"), "needs calibration"),
        (dict(adapter_init="orthogonal"), "adapter_init: must be one of random, identity, lstsq"),
        (dict(dtype="float12"), "dtype: unknown dtype"),
    ],
)
def test_bad_assembly_arguments(small_donor: Path, large_donor: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_split_model(small_donor, large_donor, 1, 1, **kwargs)


# ---------------------------------------------------------------------------- checkpoint faults
def copy_donor(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    donor = copy_donor(large_donor, tmp_path / "large")
    shard = sorted(donor.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"path70b: shard .*{shard.name} listed in model.safetensors.index.json is missing"):
        build_split_model(small_donor, donor, 1, 1)


def test_truncated_file(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    donor = copy_donor(small_donor, tmp_path / "small")
    shard = sorted(donor.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        build_split_model(donor, large_donor, 1, 1)


def test_missing_tensor(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    donor = copy_donor(large_donor, tmp_path / "large")
    index_path = donor / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = donor / index["weight_map"].pop("model.layers.7.mlp.up_proj.weight")
    index_path.write_text(json.dumps(index))
    # the tensor gone from its shard too (an index without it and a shard with it disagree: refused as such)
    from safetensors.torch import load_file, save_file

    rest = {k: v for k, v in load_file(shard).items() if k != "model.layers.7.mlp.up_proj.weight"}
    save_file(rest, shard) if rest else shard.unlink()
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.7.mlp.up_proj.weight' in path70b"):
        build_split_model(small_donor, donor, 1, 1)
    build_split_model(small_donor, donor, 1, 1, layers_70=[6])  # a selection that does not need it still works


def test_wrong_shape(tmp_path: Path, small_donor: Path) -> None:
    cfg = llama_config(**LARGE)
    donor = make_random_donor(tmp_path / "large", cfg)
    wrong = {**LARGE, "intermediate_size": cfg.intermediate_size + 8}
    (donor / "config.json").write_text(json.dumps({**json.loads((donor / "config.json").read_text()), "intermediate_size": wrong["intermediate_size"]}))
    with pytest.raises(CheckpointError, match=r"path70b: tensor 'model.layers.7.mlp.up_proj.weight' has shape \[448, 128\], but .* needs \[456, 128\]"):
        build_split_model(small_donor, donor, 1, 1)


def test_vocab_mismatch(tmp_path: Path, small_donor: Path) -> None:
    donor = make_random_donor(tmp_path / "v", llama_config(**{**LARGE, "vocab_size": VOCAB + 8}))
    with pytest.raises(SplitConfigError, match=r"donors must share one vocabulary"):
        build_split_model(small_donor, donor, 1, 1)


def test_not_a_checkpoint(tmp_path: Path, small_donor: Path) -> None:
    (tmp_path / "config.json").write_text((small_donor / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"path70b: no model.safetensors or model.safetensors.index.json .*convert to safetensors"):
        build_split_model(small_donor, tmp_path, 1, 1)


# ---------------------------------------------------------------------------- seed-style dirs, tokenizer
def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)


def test_seed_style_directory_and_tokenizer(tmp_path: Path, small_donor: Path, large_donor: Path) -> None:
    small = copy_donor(small_donor, tmp_path / "small")
    make_tokenizer(small)
    seed_dir = tmp_path / "split"
    seed_dir.mkdir()
    (seed_dir / "config.json").write_text(json.dumps({
        "architectures": ["CustomSplitLLamaForCausalLM"], "model_type": "custom_split_llama",
        "path8b": str(small), "path70b": str(large_donor), "num_layers_8": 2, "num_layers_70": 3, "mlp": False,
        "assemble_from_donors": True,
    }))
    adapter = {"adapter.adapter_linear_1.weight": torch.randn(128, 64), "adapter.adapter_linear_1.bias": torch.zeros(128)}
    save_file(adapter, seed_dir / "adapter.safetensors")
    model = AutoModelForCausalLM.from_pretrained(seed_dir)
    assert torch.equal(model.model.adapter.adapter_linear_1.weight, adapter["adapter.adapter_linear_1.weight"])
    assert model.config.layers_70 == [5, 6, 7]
    reference = build_split_model(small, large_donor, 2, 3, adapter_checkpoint=seed_dir / "adapter.safetensors")
    x = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(model(x).logits, reference(x).logits)

    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w5 w9")["input_ids"][-2:] == [5, 9]
    again = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(again(x).logits, model(x).logits)


def test_seed_style_directory_without_paths(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom_split_llama", "num_layers_8": 2, "num_layers_70": 3,
                                                        "assemble_from_donors": True}))
    with pytest.raises(SplitConfigError, match=r"config_8b: small donor unknown: give path8b"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- lstsq stitching baseline
def markov_tokens(n_seq: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed sparse Markov chain: learnable structure, so loss differences are real."""
    g = torch.Generator().manual_seed(1234)
    successors = torch.randint(3, vocab, (vocab, 3), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_seq, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(3, vocab, (n_seq,), generator=g)
    for t in range(1, seq_len):
        choice = torch.randint(0, 3, (n_seq,), generator=g)
        out[:, t] = successors[out[:, t - 1], choice]
    return out


def train_donor(path: Path, cfg_kwargs: dict, data: torch.Tensor, steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**cfg_kwargs))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[(step * 16) % len(data):][:16]
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path


def held_out_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    with torch.no_grad():
        return model(data, labels=data).loss.item()


def test_lstsq_beats_random_before_training(tmp_path: Path) -> None:
    vocab = 64
    train, held_out = markov_tokens(256, 32, vocab, seed=0), markov_tokens(32, 32, vocab, seed=1)
    small_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=vocab)
    large_cfg = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=vocab)
    small = train_donor(tmp_path / "s", small_cfg, train, steps=120, seed=0)
    large = train_donor(tmp_path / "l", large_cfg, train, steps=120, seed=1)
    losses = {}
    for init in ("random", "lstsq"):
        model = build_split_model(small, large, 2, 2, adapter="linear", adapter_init=init, calibration=train[:64], seed=0)
        losses[init] = held_out_loss(model, held_out)
    losses["large donor"] = held_out_loss(LlamaForCausalLM.from_pretrained(large), held_out)
    print(losses)
    assert losses["lstsq"] < losses["random"] - 0.5, losses
    assert losses["lstsq"] < losses["large donor"] + 0.5, losses
    lowrank = build_split_model(small, large, 2, 2, adapter="lowrank", adapter_rank=16, adapter_init="lstsq", calibration=train[:64])
    assert held_out_loss(lowrank, held_out) < losses["random"], "rank-16 truncation of the lstsq map should still beat random"
    # an MLP twice as wide as the small hidden size holds the least-squares map exactly (ReLU(z) - ReLU(-z) = z):
    # it starts where the linear adapter starts, not at random
    linear = build_split_model(small, large, 2, 2, adapter="linear", adapter_init="lstsq", calibration=train[:64], seed=0)
    mlp = build_split_model(small, large, 2, 2, adapter="mlp", adapter_hidden_size=80, adapter_init="lstsq", calibration=train[:64], seed=0)
    x = torch.randn(5, 7, 32)
    with torch.no_grad():
        assert torch.allclose(mlp.model.adapter(x), linear.model.adapter(x), atol=1e-4)
    assert held_out_loss(mlp, held_out) == pytest.approx(losses["lstsq"], abs=1e-4)
    # narrower than twice the small width: the best rank-(hidden // 2) part of the map, still far better than random
    narrow = build_split_model(small, large, 2, 2, adapter="mlp", adapter_hidden_size=32, adapter_init="lstsq", calibration=train[:64])
    assert held_out_loss(narrow, held_out) < losses["random"] - 0.3
    # identity for an MLP between equal widths is the identity map
    same = build_split_model(small, small, 1, 1, adapter="mlp", adapter_hidden_size=64, adapter_init="identity")
    with torch.no_grad():
        assert torch.allclose(same.model.adapter(x), x, atol=1e-6)
