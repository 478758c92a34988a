"""The megatron-core backend against the HF backend on the same weights.

CPU (gloo): at TP=1 in this process (logits, loss, gradients through megatron's schedule, packed
input, value head, export, Lightning, run.py), and 2-process TP=2 jobs, both run by one pair of ranks
(each rank's loaded slices, logits, packed input, value head, export; and the loss, logits and every
gradient through megatron's schedule on 1024-token micro-batches). Pipeline and sequence parallelism
and bfloat16 need GPUs: those are the ``gpu`` tests at the end (run by scripts/gpu.sh on a 2-GPU machine).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import import_extra, run_py_checks  # noqa: E402

import_extra("megatron.core", "megatron-core", "megatron")

from splitllama import CustomSplitLLamaForValue, SplitLlamaConfig, build_split_model  # noqa: E402
from splitllama.checkpoint import CheckpointError  # noqa: E402
from tests.donors import llama_config, make_random_donor  # noqa: E402

from .conftest import LARGE  # noqa: E402
from .megatron_helpers.worker import job_results, run_worker_jobs, run_workers  # noqa: E402

pytestmark = pytest.mark.megatron
warnings.filterwarnings("ignore", message=".*Transformer Engine.*|.*Apex.*")

ATOL = 2e-5  # float32 on CPU: the two backends differ only in summation order


@pytest.fixture(scope="module")
def megatron_world():
    """megatron's parallel state over a gloo world of this one process (TP=PP=1), torn down afterwards."""
    import torch.distributed as dist
    from splitllama.megatron.parallel import destroy_megatron_parallel, initialize_megatron_parallel

    created = not dist.is_initialized()
    rendezvous = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    initialize_megatron_parallel(1, 1, backend="gloo")
    yield
    destroy_megatron_parallel(destroy_process_group=created)
    for key, value in rendezvous.items():  # set for the world above; a later lm_eval or Lightning process would read them
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def llama3_donor(donor_root: Path) -> Path:
    """The large donor's shape with Llama-3.1 rope scaling and another theta (our rotary must follow both)."""
    config = llama_config(**LARGE)
    config.rope_parameters = {
        "rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    }
    return make_random_donor(donor_root / "large_llama3", config, seed=5)


def megatron_model(config: SplitLlamaConfig, small: Path, large: Path, **kwargs: Any) -> Any:
    from splitllama.megatron.lightning import build_megatron_split_model

    return build_megatron_split_model(config, path8b=small, path70b=large, **kwargs)


def ids_batch(config: SplitLlamaConfig, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ no parallel state
def test_registry_lists_the_split_architecture() -> None:
    from splitllama.megatron import ModelRegistry
    from splitllama.megatron.modeling_split_llama_megatron import (
        ParallelCustomSplitLLamaForCausalLMRmPadPP,
        ParallelCustomSplitLLamaForValueRmPadPP,
    )

    assert "CustomSplitLLamaForCausalLM" in ModelRegistry.get_supported_archs()
    assert ModelRegistry.load_model_cls("CustomSplitLLamaForCausalLM") is ParallelCustomSplitLLamaForCausalLMRmPadPP
    assert ModelRegistry.load_model_cls("CustomSplitLLamaForCausalLM", value=True) is ParallelCustomSplitLLamaForValueRmPadPP
    with pytest.raises(ValueError, match="LlamaForCausalLM.*supported: CustomSplitLLamaForCausalLM"):
        ModelRegistry.load_model_cls("LlamaForCausalLM")


@pytest.mark.parametrize(
    ("n", "m", "pp", "expected"),
    [
        # (first layers, last layers, adapter) per stage
        (2, 2, 2, [((0, 2), (0, 0), True), ((2, 2), (0, 2), False)]),
        (3, 2, 2, [((0, 3), (0, 0), True), ((3, 3), (0, 2), False)]),
        (1, 4, 2, [((0, 1), (0, 2), True), ((1, 1), (2, 4), False)]),
        (4, 1, 2, [((0, 3), (0, 0), False), ((3, 4), (0, 1), True)]),
        (0, 3, 3, [((0, 0), (0, 1), True), ((0, 0), (1, 2), False), ((0, 0), (2, 3), False)]),
    ],
)
def test_pipeline_layout_puts_the_adapter_with_the_last_small_layer(n: int, m: int, pp: int, expected: list) -> None:
    from splitllama.megatron.modeling_split_llama_megatron import SplitStageLayout

    config = SplitLlamaConfig(config_8b=llama_config(num_hidden_layers=4), config_70b=llama_config(hidden_size=96, num_attention_heads=6, num_hidden_layers=4), num_layers_8=n, num_layers_70=m)
    for stage, (first, last, adapter) in enumerate(expected):
        layout = SplitStageLayout.for_stage(config, stage, pp)
        assert (layout.first.start, layout.first.stop) == first if len(layout.first) else first[0] == first[1]
        assert (layout.last.start, layout.last.stop) == last if len(layout.last) else last[0] == last[1]
        assert layout.has_adapter is adapter
        assert layout.pre_process is (stage == 0) and layout.post_process is (stage == pp - 1)
    with pytest.raises(ValueError, match="exceeds the split model's"):
        SplitStageLayout.for_stage(config, 0, n + m + 1)


def test_rotary_follows_the_donor_rope_parameters(llama3_donor: Path, large_donor: Path) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from splitllama.megatron.layers.rotary import LlamaRotaryAngles

    positions = torch.arange(40)[None]
    for donor in (llama3_donor, large_donor):
        config = LlamaConfig.from_pretrained(donor)
        cos, _ = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
        angles = LlamaRotaryAngles(config)(positions)  # [s, b, 1, d]
        torch.testing.assert_close(angles[:, 0, 0].cos(), cos[0], atol=0, rtol=0)
    bad = LlamaConfig.from_pretrained(large_donor)
    bad.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="config_70b.rope_parameters.rope_type: 'yarn'"):
        LlamaRotaryAngles(bad, "config_70b")


@pytest.mark.slow
def test_swiglu_kernels_have_the_gradient_of_silu_gate_times_up() -> None:
    """The MLP activation of our spec: its hand-written gradient and the compiled autograd function
    that GPUs run (compiled here by inductor on the CPU) against autograd of the reference, float64."""
    from splitllama.megatron.layers.swiglu import _CompiledSwiGLU, swiglu_grad, swiglu_reference

    x = torch.randn(6, 2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad_out = torch.randn(6, 2, 20, dtype=torch.float64)
    (expected,) = torch.autograd.grad(swiglu_reference(x), x, grad_out)
    torch.testing.assert_close(swiglu_grad(grad_out, x.detach()), expected)
    out = _CompiledSwiGLU.apply(x)
    torch.testing.assert_close(out, swiglu_reference(x.detach()))
    (compiled_grad,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(compiled_grad, expected)


# ------------------------------------------------------------------------------------------ TP=1 in this process
@pytest.mark.parametrize(
    ("adapter", "extra"), [("linear", {}), ("mlp", {"adapter_hidden_size": 96}), ("lowrank", {"adapter_rank": 8})]
)
def test_logits_and_loss_equal_the_hf_backend(megatron_world: None, small_donor: Path, llama3_donor: Path, adapter: str, extra: dict) -> None:
    hf = build_split_model(small_donor, llama3_donor, 3, 2, adapter=adapter, **extra)
    model = megatron_model(hf.config, small_donor, llama3_donor)  # same default adapter init, same seed
    from megatron.core.transformer.mlp import MLP

    from splitllama.megatron.layers.swiglu import SwiGLU

    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 5 and all(isinstance(m.activation_func, SwiGLU) for m in mlps)
    ids = ids_batch(hf.config)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref, out = hf(ids, labels=labels), model(ids, labels=labels)
    assert out.logits.shape == ref.logits.shape == (2, 24, hf.config.vocab_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)


def test_donors_with_different_kv_shapes_and_an_identity_adapter(megatron_world: None, small_donor: Path, odd_donor: Path, large_donor: Path) -> None:
    """The small donor has head_dim 16 and 2 KV heads, the odd one 24 and 4: each block has its own config."""
    ids = ids_batch(SplitLlamaConfig(path8b=str(small_donor), path70b=str(odd_donor), num_layers_8=2, num_layers_70=2))
    for large, adapter in ((odd_donor, "linear"), (small_donor, "identity")):
        hf = build_split_model(small_donor, large, 2, 2, adapter=adapter)
        model = megatron_model(hf.config, small_donor, large)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_gradients_through_the_megatron_schedule_equal_hf(megatron_world: None, small_donor: Path, large_donor: Path) -> None:
    hf = build_split_model(small_donor, large_donor, 2, 2, adapter="mlp", adapter_hidden_size=64)
    model = megatron_model(hf.config, small_donor, large_donor)
    ids = ids_batch(hf.config, batch=2, seq=16, seed=1)
    ref_loss = torch.stack([hf(ids[i:i + 1], labels=ids[i:i + 1]).loss for i in range(2)]).mean()
    ref_loss.backward()
    loss = model.forward_backward([{"input_ids": ids[i:i + 1]} for i in range(2)])
    torch.testing.assert_close(loss, ref_loss.detach(), atol=ATOL, rtol=0)
    from splitllama.megatron.checkpoint_utils.custom_split_llama_saver import gather_hf_state

    grads = gather_hf_state(model.module, hf.config, use_grad=True)
    reference = {n: p.grad for n, p in hf.named_parameters()}
    assert set(grads) == set(reference)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_documents_equal_each_sequence_run_alone(megatron_world: None, small_donor: Path, large_donor: Path) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from splitllama.megatron.modeling_split_llama_megatron import ParallelCustomSplitLLamaForCausalLMRmPad

    hf = build_split_model(small_donor, large_donor, 2, 2)
    model = megatron_model(hf.config, small_donor, large_donor)
    packed_model = ParallelCustomSplitLLamaForCausalLMRmPad(hf.config, model.module.megatron_config)
    packed_model.load_state_dict(model.module.state_dict())
    ids = ids_batch(hf.config, batch=3, seq=12, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    spans = [(0, 0, 12), (1, 0, 8), (2, 5, 12)]
    with torch.no_grad():
        out = packed_model(ids, attention_mask=mask, labels=ids)
        refs = [hf(ids[r:r + 1, a:b], labels=ids[r:r + 1, a:b]) for r, a, b in spans]
        for (r, a, b), ref in zip(spans, refs):
            torch.testing.assert_close(out.logits[r, a:b], ref.logits[0], atol=ATOL, rtol=0)
        # one loss over all documents: each document's next-token losses, never across a boundary
        total = sum(ref.loss * (b - a - 1) for (r, a, b), ref in zip(spans, refs)) / sum(b - a - 1 for _, a, b in spans)
        torch.testing.assert_close(out.loss, total, atol=ATOL, rtol=0)
        # the same documents given already packed, with cumulative sequence lengths
        docs = [ids[r, a:b] for r, a, b in spans]
        cu = torch.tensor([0, 12, 20, 27], dtype=torch.int32)
        given = model(torch.cat(docs)[None], packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12))
        for (r, a, b), start, ref in zip(spans, cu[:-1].tolist(), refs):
            torch.testing.assert_close(given.logits[0, start:start + b - a], ref.logits[0], atol=ATOL, rtol=0)
    # a padded batch without packing (attention mask only) gives the same logits on real tokens
    plain = model(ids[1:2], attention_mask=mask[1:2])
    torch.testing.assert_close(plain.logits[0, :8], refs[1].logits[0], atol=ATOL, rtol=0)


def test_value_head_equals_the_hf_value_model(megatron_world: None, small_donor: Path, large_donor: Path, tmp_path: Path) -> None:
    from splitllama.megatron.lightning import build_megatron_split_model

    hf = build_split_model(small_donor, large_donor, 2, 2, model_class=CustomSplitLLamaForValue)
    with torch.no_grad():
        hf.value_head.weight.normal_(generator=torch.Generator().manual_seed(0))
        hf.value_head.bias.fill_(0.25)
    hf.save_pretrained(tmp_path / "value")
    model = build_megatron_split_model(None, hf_split_dir=tmp_path / "value", value=True)
    ids = ids_batch(hf.config, batch=2, seq=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        values = model.module(ids, attention_mask=mask).values
        torch.testing.assert_close(values[0], hf(ids[:1]).values[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(values[1, :6], hf(ids[1:, :6]).values[0], atol=ATOL, rtol=0)
    assert hf(ids[:1]).values.abs().max() > 0.1  # the head is not trivially zero
    # from the donors (a causal LM has no value head): the head starts at zero, as in the HF backend
    fresh = megatron_model(hf.config, small_donor, large_donor, value=True)
    assert not fresh.module.value_head.weight.any() and not fresh.module.value_head.bias.any()


def test_export_round_trip_loads_in_transformers(megatron_world: None, small_donor: Path, large_donor: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from splitllama.megatron.lightning import build_megatron_split_model, export_hf

    hf = build_split_model(small_donor, large_donor, 2, 3, adapter="lowrank", adapter_rank=4)
    hf.save_pretrained(tmp_path / "hf")
    model = build_megatron_split_model(None, hf_split_dir=tmp_path / "hf")
    out = export_hf(model, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(hf)
    reference = hf.state_dict()
    exported = loaded.state_dict()
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    assert (out / "configuration_split_llama.py").is_file() and (out / "modeling_split_llama.py").is_file()


def test_bad_inputs_fail_before_reading_weights(megatron_world: None, small_donor: Path, large_donor: Path, tied_large_donor: Path, tmp_path: Path,
                                               tensor_reads: list[str]) -> None:
    from splitllama.megatron.checkpoint_utils.custom_split_llama_loader import load_custom_split_llama_weights
    from splitllama.megatron.lightning import build_megatron_split_model

    config = SplitLlamaConfig(path8b=str(small_donor), path70b=str(large_donor), num_layers_8=2, num_layers_70=2)
    # a donor missing a tensor: the error names it and the checkpoint
    from safetensors.torch import load_file

    small_state = {}
    for f in small_donor.glob("*.safetensors"):
        small_state.update(load_file(f))
    large_state = {}
    for f in large_donor.glob("*.safetensors"):
        large_state.update(load_file(f))
    model = build_megatron_split_model(config, random_init=True)
    del small_state["model.layers.1.mlp.up_proj.weight"]
    # from the donors' files: the error comes before any tensor is read from them
    from safetensors.torch import save_file

    broken = tmp_path / "broken_small"
    broken.mkdir()
    save_file(small_state, str(broken / "model.safetensors"))
    shutil.copy(small_donor / "config.json", broken / "config.json")
    tensor_reads.clear()
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        megatron_model(config, broken, large_donor)
    assert tensor_reads == []
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' in state_dict_8b"):
        load_custom_split_llama_weights(small_state, large_state, None, [model.module], config, torch.float32)
    # an adapter of the wrong shape
    with pytest.raises(CheckpointError, match=r"adapter: 'adapter_linear_1.weight' has shape \[3, 3\]"):
        load_custom_split_llama_weights(
            small_state | {"model.layers.1.mlp.up_proj.weight": torch.zeros(224, 64)}, large_state,
            {"adapter_linear_1.weight": torch.zeros(3, 3), "adapter_linear_1.bias": torch.zeros(128)}, [model.module], config, torch.float32,
        )
    with pytest.raises(ValueError, match="adapter_init: the megatron loader takes random, identity"):
        build_megatron_split_model(config, adapter_init="lstsq")
    # a saved split model without adapter weights is refused, not randomly initialised
    hf = build_split_model(small_donor, large_donor, 2, 2)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.adapter.")}

    (tmp_path / "noadapter").mkdir()
    hf.config.save_pretrained(tmp_path / "noadapter")
    save_file(state, str(tmp_path / "noadapter" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="adapter: missing 'adapter_linear_1.weight'"):
        build_megatron_split_model(None, hf_split_dir=tmp_path / "noadapter")
    # tied embeddings: the LM head is read from embed_tokens (plan fallback)
    tied = build_split_model(small_donor, tied_large_donor, 1, 1)
    model = megatron_model(tied.config, small_donor, tied_large_donor)
    ids = ids_batch(tied.config, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tied(ids).logits, atol=ATOL, rtol=0)


def test_lightning_strategy_trains_only_the_adapter(megatron_world: None, small_donor: Path, large_donor: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from splitllama.megatron.lightning import MegatronStrategy, build_megatron_backend
    from splitllama.backend.interface import SplitModelSpec

    spec = SplitModelSpec(path8b=str(small_donor), path70b=str(large_donor), num_layers_8=2, num_layers_70=2, adapter="linear")
    ids = ids_batch(spec.split_config(), batch=8, seq=16, seed=3)

    class Module(pl.LightningModule):
        def configure_model(self) -> None:
            self.backend = build_megatron_backend(spec, {"tp": 1})
            self.trainable = self.backend.select_trainable(["adapter"], None)
            self.model = self.backend.model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(batch[0], labels=batch[0], return_logits=False).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    trainer = pl.Trainer(
        strategy=MegatronStrategy(tensor_model_parallel_size=1), accelerator="cpu", devices=1, max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=0.5, default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert module.trainable == ["module.model.adapter.adapter_linear_1.weight", "module.model.adapter.adapter_linear_1.bias"]
    fresh = build_megatron_backend(spec, {"tp": 1}).model
    trained = dict(module.model.named_parameters())
    for name, param in fresh.named_parameters():
        changed = not torch.equal(param, trained[name])
        assert changed is name.startswith("module.model.adapter."), name
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
    out = module.backend.export_hf(tmp_path / "trained")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded.model.adapter.adapter_linear_1.weight, trained["module.model.adapter.adapter_linear_1.weight"])


# ------------------------------------------------------------------------------------------ run.py backend=megatron
@pytest.fixture(scope="module")
def megatron_run(megatron_world: None, run_py: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run.py debug=quick backend=megatron`` with each batch of 4 cut into two micro-batches for megatron's
    schedule, run in this process (``run_py.inline``: Hydra parses the overrides as for a user) over
    ``megatron_world``'s gloo world of one, whose TP=PP=1 groups the run's strategy finds and keeps. One
    rank, so nothing here is about processes; the two-rank run below stays a subprocess. Shared by the
    export check and the data-parallel comparison (one run instead of two of the same size)."""
    run_dir = tmp_path_factory.mktemp("megatron_run")
    run_py.inline("debug=quick", "backend=megatron", "backend.micro_batch_size=2", "logger=csv", f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


def test_run_py_megatron_trains_and_its_export_reproduces_the_val_loss(megatron_run: Path, run_py: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from splitllama.results import read_results

    trained = read_results(megatron_run)
    assert trained["status"] == "ok" and trained["metrics"]["steps"] == 8
    assert trained["config"]["backend"]["name"] == "megatron" and trained["config"]["backend"]["tp"] == 1
    assert trained["metrics"]["val_loss"] < trained["metrics"]["val_loss_before"]  # the adapter learned something
    model = AutoModelForCausalLM.from_pretrained(megatron_run / "hf_model")
    assert model.config.adapter == "linear"
    # the exported checkpoint scored by the HF backend on the same held-out split gives the megatron run's val loss
    run_py.inline("debug=quick", "task=eval", f"task.model_dir={megatron_run / 'hf_model'}", "logger=none",
                  f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    evaluated = read_results(tmp_path)
    assert evaluated["status"] == "ok"
    assert evaluated["metrics"]["val_loss"] == pytest.approx(trained["metrics"]["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_run_py_megatron_micro_batches_and_data_parallel_agree(megatron_run: Path, run_py: Any, tmp_path: Path) -> None:
    """Manual optimisation through megatron's schedule: one process cutting each batch of 4 into two
    micro-batches (``megatron_run``), and two data-parallel processes (gloo, a subprocess: run.py starts
    its ranks) with batches of 2, see the same samples per step, so the gradient accumulation and the DP
    averaging must give the same training."""
    dp = tmp_path / "dp"
    run_py("debug=quick", "backend=megatron", "logger=csv", "parallel=ddp", "parallel.devices=2", "parallel.accelerator=cpu",
           "data.batch_size=2", f"hydra.run.dir={dp}", cwd=tmp_path, timeout=600)
    from splitllama.results import read_results

    one, two = read_results(megatron_run), read_results(dp)
    assert one["config"]["backend"]["micro_batch_size"] == 2 and one["config"]["data"]["batch_size"] == 4
    assert one["status"] == "ok" and two["status"] == "ok", (one.get("error"), two.get("error"))
    assert one["metrics"]["steps"] == two["metrics"]["steps"] == 8
    assert one["metrics"]["train_tokens_seen"] == two["metrics"]["train_tokens_seen"]
    assert one["metrics"]["val_loss"] < one["metrics"]["val_loss_before"] - 1e-3
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], abs=2e-5)


RUN_PY_BAD_PARALLEL = [
    (["parallel=tp2"], "backend.tp=2: needs backend=megatron"),
    (["backend=megatron", "backend.micro_batch_size=3"], "backend.micro_batch_size=3: must be >= 1 and divide data.batch_size=4"),
    (["backend=megatron", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2: must be 1 with backend=megatron"),
    (["backend=megatron", "parallel=tp2", "backend.tp=3", "parallel.devices=3"], "backend.tp=3: must divide"),
]


@pytest.mark.parametrize(("overrides", "named"), RUN_PY_BAD_PARALLEL, ids=[" ".join(o) for o, _ in RUN_PY_BAD_PARALLEL])
def test_run_py_bad_parallel_settings_fail_naming_the_field(overrides: list[str], named: str) -> None:
    """What run.py checks before any process starts (in-process: test_run.py checks run.py's exit and message)."""
    from splitllama.errors import RunConfigError

    with pytest.raises(RunConfigError) as refused:
        run_py_checks("debug=quick", *overrides)
    assert named in str(refused.value)


# ------------------------------------------------------------------------------------------ TP=2 over gloo
@pytest.fixture(scope="module")
def tp2_cpu_ranks(small_donor: Path, large_donor: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two TP=2 CPU jobs below, run one after the other by one pair of gloo ranks: one spawn, and one
    import of torch, transformers and megatron per rank, for both (each job builds its own models).
    For each job, the ranks' results, or the error that says why it has none."""
    tmp = tmp_path_factory.mktemp("tp2_cpu")
    hf = build_split_model(small_donor, large_donor, 2, 2, model_class=CustomSplitLLamaForValue)
    with torch.no_grad():
        hf.value_head.weight.normal_(generator=torch.Generator().manual_seed(1))
    hf.save_pretrained(tmp / "value")
    donors = {"small": str(small_donor), "large": str(large_donor), "tp": 2}
    jobs = {
        "tp2": {
            "out": str(tmp / "tp2"), **donors,
            "split": {"num_layers_8": 2, "num_layers_70": 2, "adapter": "mlp", "adapter_hidden_size": 64},
            "value_dir": str(tmp / "value"), "checks": ["slices", "forward", "packed", "value", "export"],
        },
        "long_grads": {
            "out": str(tmp / "long_grads"), **donors, "seq": 1024,
            "split": {"num_layers_8": 2, "num_layers_70": 1, "adapter": "mlp", "adapter_hidden_size": 64},
            "checks": ["forward", "grads"],
        },
    }
    return dict(zip(jobs, run_worker_jobs(list(jobs.values()), world=2)))


@pytest.mark.slow
def test_tensor_parallel_2_on_cpu(tp2_cpu_ranks: dict[str, Any]) -> None:
    """Two gloo ranks: each holds the right donor slices, and logits, packed input, values and export match HF."""
    results = job_results(tp2_cpu_ranks["tp2"])
    assert [r["tp_rank"] for r in results] == [0, 1]
    for r in results:
        assert r["slices"]["max_diff"] == 0.0 and r["slices"]["checked"] == 4 * 6 + 3, r["slices"]
        assert r["forward"]["logits"] < ATOL and r["forward"]["loss"] < ATOL, r["forward"]
        assert r["forward"]["shape"] == [2, 16, 256]
        # the packed model scatters logits back to the real tokens only: padded positions stay exactly zero
        assert r["packed"]["logits"] < ATOL and r["packed"]["padding_logits"] == 0.0, r["packed"]
        assert r["packed"]["mask_bug_logits"] > 100 * ATOL and r["packed"]["varlen_calls"] == 0, r["packed"]  # CPU: the mask path
        assert r["value"]["values"] < ATOL and r["value"]["scale"] > 0.1, r["value"]
    export = results[0]["export"]
    assert export["missing"] == [] and export["extra"] == [] and export["max_diff"] == 0.0, export


@pytest.mark.parametrize(("batch", "seq", "multiple"), [(2, 5, 1), (3, 4, 5), (1, 7, 2), (2, 8, 4)])
def test_packing_rows_without_a_mask_equals_packing_with_an_all_ones_mask(batch: int, seq: int, multiple: int) -> None:
    """The unmasked packing (built from shapes, no read-back from the GPU: pipeline stages pack every micro-batch)
    gives the same packed row, positions, boundaries, indices and lengths as the masked path, SP padding included."""
    from splitllama.megatron.modeling_split_llama_megatron import pack_sequences

    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
    fast, masked = pack_sequences(ids, None, multiple), pack_sequences(ids, torch.ones_like(ids), multiple)
    for field in ("input_ids", "position_ids", "cu_seqlens", "indices"):
        a, b = getattr(fast, field), getattr(masked, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert (fast.max_seqlen, fast.batch, fast.seq, fast.real_tokens) == (masked.max_seqlen, masked.batch, masked.seq, masked.real_tokens)


@pytest.mark.slow
def test_tensor_parallel_gradients_on_long_sequences_equal_hf_on_cpu(tp2_cpu_ranks: dict[str, Any]) -> None:
    """TP=2 over gloo, two 1024-token micro-batches through megatron's schedule: the loss, logits and every gradient
    equal the HF model's, each within 1e-3 of its own largest entry. The random ids include the pad id 0, whose
    embedding row transformers' ``padding_idx`` leaves untrained: megatron's vocab-parallel embedding must too
    (it trained that row, 87% off, before the hook in ``ParallelSplitLlamaBody._freeze_padding_row``)."""
    results = job_results(tp2_cpu_ranks["long_grads"])
    assert [r["tp_rank"] for r in results] == [0, 1]
    for r in results:
        assert r["forward"]["logits"] < ATOL and r["forward"]["loss"] < ATOL, r["forward"]
        grads = r["grads"]
        assert grads["loss"] < 1e-4 and grads["compared"] > 0, grads
        assert grads["without_grad"] == [] and grads["not_in_reference"] == [], grads
        assert grads["max_grad_diff"] < 1e-4 * max(1.0, grads["grad_scale"]), grads
        assert grads["max_relative_grad_diff"] < 1e-3, grads


# ------------------------------------------------------------------------------------------ GPUs
def gpu_job(tmp_path: Path, small: Path, large: Path, **parallel: Any) -> dict[str, Any]:
    return {
        "out": str(tmp_path / "job"), "small": str(small), "large": str(large), "device": "cuda",
        "split": {"num_layers_8": 3, "num_layers_70": 3, "adapter": "linear"}, "seq": 32, **parallel,
    }


def _two_gpus(needed: int = 2) -> None:
    if torch.cuda.device_count() < needed:
        pytest.fail(f"this gpu test needs {needed} CUDA GPUs (run the gpu tests on the device machine: scripts/gpu.sh)")


@pytest.mark.gpu
@pytest.mark.parametrize(("tp", "pp", "sp"), [(2, 1, False), (2, 1, True), (1, 2, False)], ids=["tp2", "tp2-sp", "pp2"])
def test_parallel_training_step_equals_hf_on_gpus(small_donor: Path, large_donor: Path, tmp_path: Path, tp: int, pp: int, sp: bool) -> None:
    """Loss and every gradient after megatron's schedule (two micro-batches) equal HF's, float32 on 2 GPUs."""
    _two_gpus()
    checks = ["grads", "export"] + (["slices", "forward", "packed"] if pp == 1 else ["slices"])
    results = run_workers({**gpu_job(tmp_path, small_donor, large_donor, tp=tp, pp=pp, sp=sp), "checks": checks}, world=2)
    for r in results:
        grads = r["grads"]
        if r["pp_rank"] == pp - 1:
            assert grads["loss"] < 1e-4, grads
        assert grads["compared"] > 0 and grads["max_grad_diff"] < 1e-4 * max(1.0, grads["grad_scale"]), grads
        assert grads["without_grad"] == [] and grads["not_in_reference"] == [], grads
        assert r["slices"]["max_diff"] == 0.0, r["slices"]
        if pp == 1:
            assert r["forward"]["logits"] < 1e-4 and r["forward"]["loss"] < 1e-4, r["forward"]
            assert r["packed"]["logits"] < 1e-4, r["packed"]
    export = results[0]["export"]
    assert export["missing"] == [] and export["extra"] == [] and export["max_diff"] == 0.0, export


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_packed_bfloat16_on_gpu_uses_varlen_attention(small_donor: Path, large_donor: Path, tmp_path: Path, tp: int) -> None:
    """bf16 packed documents through flash varlen attention (torch >= 2.9 on CUDA) against each sequence
    alone: within bf16 tolerance, and well inside what a masking bug (a row attending to its padding) changes.
    On one GPU (tp1: every head on one rank) and on two (tp2: each rank half the heads)."""
    _two_gpus(needed=tp)
    job = {**gpu_job(tmp_path, small_donor, large_donor, tp=tp, dtype="bfloat16"), "checks": ["packed"]}
    for r in run_workers(job, world=tp):
        packed = r["packed"]
        assert packed["varlen_calls"] > 0, packed  # the varlen path ran, not the per-document fallback
        assert packed["logits"] < 0.1 and packed["logits"] < packed["mask_bug_logits"] / 4, packed
        assert packed["padding_logits"] == 0.0, packed


# run.py through Lightning on 2 GPUs: TP, TP+SP and PP training equal one GPU's (float32, same samples).
# Every job is bounded: a collective that waits longer than parallel.timeout_s fails, and a rank that
# sees no batch for trainer.hang_timeout_s dumps its threads' stacks and exits.
GPU_RUN = ("debug=quick", "backend=megatron", "logger=csv", "parallel.timeout_s=240", "trainer.hang_timeout_s=240")


@pytest.fixture(scope="module")
def gpu_single_run(run_py: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("gpu_single")
    run_py(*GPU_RUN, "parallel=single", "parallel.accelerator=gpu", f"hydra.run.dir={run_dir}", cwd=run_dir, timeout=600)
    return run_dir


@pytest.mark.gpu
@pytest.mark.parametrize("parallel", ["tp2", "tp2_sp", "pp2"])
def test_run_py_parallel_training_on_gpus_equals_one_gpu(parallel: str, gpu_single_run: Path, run_py: Any, tmp_path: Path) -> None:
    """``run.py backend=megatron parallel=<tp2|tp2_sp|pp2>``, stopped after 4 of 8 steps and resumed from its
    per-rank checkpoints, reaches the one-GPU run's validation loss (1e-4: float32, other reduction order)
    with the same whole-model parameter counts; its export reloads (one process, CPU) to the same loss.
    pp2 pipelines 4 micro-batches per step."""
    _two_gpus()
    from splitllama.results import read_results

    run_dir = tmp_path / "run"
    run_py(*GPU_RUN, f"parallel={parallel}", "task.stop_after_steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # validation before training: every rank keeps its own shard (no broadcast from rank 0 over the world)
    before = read_results(run_dir)["metrics"]["val_loss_before"]
    assert before == pytest.approx(read_results(gpu_single_run)["metrics"]["val_loss_before"], abs=1e-4)
    run_py(*GPU_RUN, f"parallel={parallel}", "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600)
    one, two = read_results(gpu_single_run), read_results(run_dir)
    assert two["status"] == "ok", two.get("error")
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    assert two["params"] == one["params"]
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], abs=1e-4)
    assert one["metrics"]["val_loss"] < one["metrics"]["val_loss_before"] - 1e-3
    # the export gathered every shard: scored alone (HF backend, CPU) it gives the run's loss
    eval_dir = tmp_path / "eval"
    run_py("debug=quick", "logger=csv", "task=eval", f"task.model_dir={run_dir / 'hf_model'}", "parallel.accelerator=cpu",
           f"hydra.run.dir={eval_dir}", cwd=tmp_path, timeout=600)
    assert read_results(eval_dir)["metrics"]["val_loss"] == pytest.approx(two["metrics"]["val_loss"], abs=1e-4)


# ------------------------------------------------------------------------------------------ exact resume
@pytest.fixture(scope="module")
def uninterrupted_megatron_fit(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, list]:
    from .test_training import quick_fit

    return quick_fit(embedded_cache, tmp_path_factory.mktemp("megatron_uninterrupted"), "backend=megatron")


# The stop points that differ: before and after the validation and periodic checkpoint at step 4 of 8
# (val_check_interval = checkpoint_every_n_steps = 4). There is no accumulation boundary (the backend
# refuses accumulate_grad_batches > 1: micro-batches are inside a step) and no epoch boundary (the run
# is one Lightning epoch, and its 8 x 4 samples stay in the first pass over debug=quick's blocks). A stop
# in the lr warmup (step 1) or with one step left (7) restores the same state as 3 or 5 (optimizer, lr
# schedule, data position); test_training.py stops the HF backend at more points (2, 4, 5, 7, and
# test_run.py's 3) through the same callbacks and checkpoints.
@pytest.mark.parametrize("stop", [3, 5], ids=["before half", "after half"])
def test_megatron_resume_takes_the_same_batches_and_reaches_the_same_loss(
    embedded_cache: Path, tmp_path: Path, uninterrupted_megatron_fit: tuple[float, list], stop: int
) -> None:
    """backend=megatron (manual optimisation through megatron's schedule) stopped after ``stop`` of 8
    steps and resumed: the uninterrupted batches and final validation loss, exactly."""
    from .test_training import quick_fit

    full_loss, full_batches = uninterrupted_megatron_fit
    _, first = quick_fit(embedded_cache, tmp_path, "backend=megatron", f"task.stop_after_steps={stop}")
    resumed_loss, rest = quick_fit(embedded_cache, tmp_path, "backend=megatron", resume=True)
    assert first + rest == full_batches and len(first) == stop
    assert resumed_loss == full_loss
