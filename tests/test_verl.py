"""The split model as veRL 0.9.1 uses it: plug-in, actor forward (remove padding), one policy update, critic.

Runs in the veRL environment (``bash scripts/setup.sh --verl``: ``.venv-verl`` with veRL 0.9.1 and
its pins, transformers < 5.11), on the CPU, with veRL's own helpers: its Auto-class choice
(``get_hf_auto_model_class``), ``logprobs_from_logits``, ``compute_position_id_with_mask`` and the
PPO policy loss of ``core_algos``. Elsewhere (no veRL) the module is skipped, unless
``SPLITLLAMA_REQUIRE_VERL=1`` (the CI step of the veRL environment sets it) makes that an error.

veRL's remove-padding forward: the batch's sequences, unpadded, as one row; ``position_ids``
restarting at 0 for each sequence; no attention mask. transformers derives the block-diagonal
causal mask from those position ids (sdpa, eager) or passes them to flash-attention's varlen
kernel (flash_attention_2, veRL's default: CUDA only, so not run here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("SPLITLLAMA_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl", reason="the veRL environment: bash scripts/setup.sh --verl")

from transformers import AutoConfig, AutoModelForTokenClassification  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.model import compute_position_id_with_mask, get_hf_auto_model_class  # noqa: E402
from verl.utils.torch_functional import logprobs_from_logits  # noqa: E402

import splitllama.verl  # noqa: E402
from splitllama import CustomSplitLLamaForCausalLM, CustomSplitLLamaForValue, build_split_model  # noqa: E402

#: token ids of four sequences of different lengths (a batch as veRL's rollout returns it)
SEQUENCES = [[1, 17, 40, 5, 9, 200, 33], [1, 8, 99], [1, 3, 3, 70, 12, 150, 44, 8, 16, 250, 7], [1, 60, 61, 62, 63]]
IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.fixture(scope="module")
def saved_split(tmp_path_factory: pytest.TempPathFactory, small_donor: Path, large_donor: Path) -> Path:
    """A saved split model whose adapter has unit-scale weights (so that it matters)."""
    model = build_split_model(path8b=small_donor, path70b=large_donor, num_layers_8=3, num_layers_70=4, adapter="linear", seed=3)
    with torch.no_grad():
        for p in model.model.adapter.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("verl") / "split"
    model.save_pretrained(path)
    return path


def load_as_verl(path: Path, attn_implementation: str) -> torch.nn.Module:
    """The actor/reference as veRL's FSDP engine builds it: config with the attention implementation,
    then the Auto class veRL picks for it (``_build_module`` in verl/workers/engine/fsdp/transformer_impl.py)."""
    hf_config = AutoConfig.from_pretrained(path, attn_implementation=attn_implementation)
    auto_class = get_hf_auto_model_class(hf_config=hf_config)
    return auto_class.from_pretrained(path, torch_dtype=torch.float32, config=hf_config)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and veRL's position ids (``compute_position_id_with_mask``)."""
    width = max(map(len, SEQUENCES))
    ids = torch.zeros(len(SEQUENCES), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(SEQUENCES):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask, compute_position_id_with_mask(mask)


def packed_batch(restart_positions: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The remove-padding row: ``(1, total)`` ids and position ids (restarting per sequence)."""
    ids = torch.tensor([t for seq in SEQUENCES for t in seq]).unsqueeze(0)
    if restart_positions:
        positions = torch.cat([torch.arange(len(seq)) for seq in SEQUENCES]).unsqueeze(0)
    else:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
    return ids, positions


def padded_logprobs(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per-sequence log-prob of each token after the first, from the padded forward."""
    ids, mask, positions = padded_batch()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    width = ids.shape[1]
    return [logp[row, width - len(seq):] for row, seq in enumerate(SEQUENCES)]


def packed_logprobs(model: torch.nn.Module, restart_positions: bool = True) -> list[torch.Tensor]:
    """The same from veRL's remove-padding forward: ids rolled by one over the packed row, as veRL rolls them."""
    ids, positions = packed_batch(restart_positions)
    logits = model(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False).logits.squeeze(0)
    logp = logprobs_from_logits(logits, torch.roll(ids, shifts=-1, dims=1).squeeze(0))
    out, start = [], 0
    for seq in SEQUENCES:
        out.append(logp[start:start + len(seq) - 1])  # the last position predicts the next sequence's first token
        start += len(seq)
    return out


# ------------------------------------------------------------------ plug-in
def test_import_verl_loads_the_plugin() -> None:
    code = (
        "import sys, verl; from transformers import AutoModelForCausalLM, AutoModelForTokenClassification; "
        "from splitllama import SplitLlamaConfig; assert 'splitllama.verl' in sys.modules, 'plug-in not loaded'; "
        "print(AutoModelForCausalLM._model_mapping[SplitLlamaConfig].__name__, "
        "AutoModelForTokenClassification._model_mapping[SplitLlamaConfig].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["CustomSplitLLamaForCausalLM", "CustomSplitLLamaForValue"]


def test_external_lib_imports_the_plugin() -> None:
    """``actor_rollout_ref.model.external_lib=splitllama.verl`` (veRL imports it with import_external_libs)."""
    from verl.utils.import_utils import import_external_libs

    import_external_libs(["splitllama.verl"])
    assert sys.modules["splitllama.verl"].VERL_ROLES["critic"][1] is CustomSplitLLamaForValue


def test_a_plugin_that_fails_to_load_says_so(tmp_path: Path) -> None:
    """A broken splitllama (here: one whose import fails) must not leave veRL silent."""
    broken = tmp_path / "splitllama"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('transformers too old for this splitllama')\n")
    proc = subprocess.run([sys.executable, "-c", "import verl; print('verl imported')"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0 and "verl imported" in proc.stdout  # veRL goes on without the plug-in ...
    assert "splitllama veRL plug-in FAILED to load (ImportError: transformers too old" in proc.stderr  # ... but not silently


# ------------------------------------------------------------------ actor
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_remove_padding_forward_equals_the_padded_forward(saved_split: Path, attn_implementation: str) -> None:
    model = load_as_verl(saved_split, attn_implementation).eval()
    assert isinstance(model, CustomSplitLLamaForCausalLM)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        padded, packed = padded_logprobs(model), packed_logprobs(model)
        crossing = packed_logprobs(model, restart_positions=False)
    for want, got in zip(padded, packed, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # without restarting positions the sequences attend across their boundaries: the test sees that
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(padded[1:], crossing[1:]))


def _actor_config() -> object:
    from verl.workers.config.actor import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=len(SEQUENCES), ppo_mini_batch_size=len(SEQUENCES),
                           use_dynamic_bsz=False, clip_ratio=0.2, rollout_n=1)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_one_policy_update_is_the_same_packed_or_padded(saved_split: Path, attn_implementation: str) -> None:
    """veRL's PPO policy loss (core_algos, vanilla, token-mean) over the response tokens, backward, one
    SGD step: the remove-padding forward gives the padded forward's gradients, so the same update.
    (SGD, not Adam: Adam's first step is about lr * sign(gradient), which turns float noise in a
    gradient near zero into a full step.)"""
    config = _actor_config()
    policy_loss = core_algos.get_policy_loss_fn("vanilla")
    advantages = [torch.linspace(-1.0, 1.0, len(seq) - 1) * (row + 1) for row, seq in enumerate(SEQUENCES)]

    def step(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = load_as_verl(saved_split, attn_implementation).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        log_prob = torch.nn.utils.rnn.pad_sequence(forward(model), batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s) - 1) for s in SEQUENCES], batch_first=True)
        adv = torch.nn.utils.rnn.pad_sequence(advantages, batch_first=True)
        old = log_prob.detach() - 0.05 * adv  # a policy that moved since the rollout: some ratios clip
        loss, _ = policy_loss(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                              loss_agg_mode="token-mean", config=config)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}

    (packed_loss, packed_grads, packed), (padded_loss, padded_grads, padded) = step(packed_logprobs), step(padded_logprobs)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-5)
    start = dict(load_as_verl(saved_split, attn_implementation).named_parameters())
    assert all(not packed[n].equal(start[n]) for n in packed if n != "model.embed_tokens.weight"), "a part did not move"
    scale = max(g.abs().max() for g in padded_grads.values())
    for name in padded:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5 * scale, rtol=1e-4, msg=name)
        torch.testing.assert_close(packed[name], padded[name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------ critic
def test_critic_loads_as_verl_loads_critics(saved_split: Path) -> None:
    """``load_valuehead_model``'s call (AutoModelForTokenClassification on the actor's directory, veRL's
    value-model config overrides), with sdpa in place of its hard-coded flash_attention_2 (CUDA only)."""
    hf_config = AutoConfig.from_pretrained(saved_split, attn_implementation="sdpa")
    hf_config.num_labels = 1
    hf_config.classifier_dropout = 0.0
    critic = AutoModelForTokenClassification.from_pretrained(saved_split, torch_dtype=torch.float32, config=hf_config)
    assert isinstance(critic, CustomSplitLLamaForValue)
    ids, positions = packed_batch()
    out = critic(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False)
    assert out.logits.shape == (1, ids.shape[1], 1)
    assert torch.count_nonzero(out.logits) == 0  # a critic made from a causal LM: the head starts at zero
    with torch.no_grad():
        critic.value_head.weight.normal_(generator=torch.Generator().manual_seed(1))
        packed = critic(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False).logits[0, :, 0]
        pids, mask, ppos = padded_batch()
        padded = critic(input_ids=pids, attention_mask=mask, position_ids=ppos, use_cache=False).logits[..., 0]
    start = 0
    for row, seq in enumerate(SEQUENCES):  # one value per token, the same packed or padded
        torch.testing.assert_close(packed[start:start + len(seq)], padded[row, -len(seq):], atol=2e-5, rtol=1e-5)
        start += len(seq)
    assert splitllama.verl.VERL_ROLES["critic"][0] is AutoModelForTokenClassification
