"""The training pieces run.py composes: objectives, schedule, FLOP count, data order and packing."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from splitllama import CustomSplitLLamaForCausalLM, SplitLlamaConfig
from tests.donors import letter_tokenizer, llama_config
from splitllama.data import pack_documents, packed_splits, split_documents
from splitllama.training.data import ResumableBlockSampler
from splitllama.flops import count_flops_per_token
from splitllama.training.module import warmup_cosine
from splitllama.training.objectives import Objective, distillation_loss, next_token_loss


def test_distillation_is_the_kl_from_the_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p_teacher = teacher[:, :-1].softmax(-1)
    kl = (p_teacher * (p_teacher.log() - student[:, :-1].log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(student, teacher) == pytest.approx(kl.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # temperature T: KL of the softened distributions, scaled by T^2
    soft = distillation_loss(student / 2, teacher / 2) * 4
    assert distillation_loss(student, teacher, temperature=2.0) == pytest.approx(soft.item(), rel=1e-5)
    with pytest.raises(ValueError, match="share one vocabulary"):
        distillation_loss(student, torch.randn(2, 5, 12))


def test_objectives_combine_the_parts() -> None:
    torch.manual_seed(1)
    logits, teacher, ids = torch.randn(2, 6, 9), torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1))
    assert next_token_loss(logits, ids) == pytest.approx(lm.item())
    assert Objective("lm")(logits, ids)["loss"] == pytest.approx(lm.item())
    kl = distillation_loss(logits, teacher)
    assert Objective("distill")(logits, ids, teacher)["loss"] == pytest.approx(kl.item())
    mixed = Objective("mixed", lm_weight=0.25, distill_weight=2.0)(logits, ids, teacher)
    assert mixed["loss"] == pytest.approx(0.25 * lm.item() + 2.0 * kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):
        Objective("distill")(logits, ids)


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(s, 4, 20, 0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay


def test_flops_per_token_counts_every_matmul_weight() -> None:
    small = llama_config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, vocab_size=300)
    large = llama_config(hidden_size=128, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                         intermediate_size=160, vocab_size=300)
    for adapter, extra in (("linear", {}), ("mlp", {"adapter_hidden_size": 48}), ("lowrank", {"adapter_rank": 8})):
        config = SplitLlamaConfig(config_8b=small, config_70b=large, num_layers_8=3, num_layers_70=2, adapter=adapter, **extra)
        model = CustomSplitLLamaForCausalLM(config)
        linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        flops = count_flops_per_token(config, seq_len=32)
        assert flops["matmul_parameters"] == linear_weights, adapter
        attention = 32 * (3 * 4 * 16 + 2 * 8 * 16)
        assert flops["train_flops_per_token"] == 6 * linear_weights + 6 * attention
        assert flops["forward_flops_per_token"] == pytest.approx(flops["train_flops_per_token"] / 3)


def test_sampler_resumes_exactly_and_shards_ranks() -> None:
    full = list(ResumableBlockSampler(7, 20, seed=3))
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))  # every epoch a permutation
    assert full[:7] != full[7:14]  # reshuffled each epoch
    assert list(ResumableBlockSampler(7, 20, seed=3, start=9)) == full[9:]
    ranks = [list(ResumableBlockSampler(7, 10, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == full  # ranks interleave the global stream
    assert list(ResumableBlockSampler(7, 10, seed=3, rank=1, world_size=2, start=4)) == ranks[1][4:]


def test_packing_adds_document_boundaries() -> None:
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    blocks = pack_documents(tokenizer, ["abc", "de", "fgh"], seq_len=4)
    stream = [1, 3, 4, 5, 2, 1, 6, 7, 2, 1, 8, 9, 10, 2]
    assert blocks.tolist() == [stream[0:4], stream[4:8], stream[8:12]]  # the short tail is dropped
    with pytest.raises(ValueError, match="data.seq_len=64"):
        pack_documents(tokenizer, ["ab"], seq_len=64)


def test_packed_blocks_are_cached_under_a_key_of_everything_that_decides_them(tmp_path: Path) -> None:
    """The cache gives the blocks tokenising gives; any change of tokenizer, text, seq_len or split is a
    new entry, never a stale hit; a damaged entry is rebuilt; a tokenizer saved and reloaded hits."""
    docs = ["".join("abcdefgh"[(i * 7 + j) % 8] for j in range(5 + i % 11)) for i in range(200)]
    tokenizer = letter_tokenizer()

    def fresh(tok: Any = tokenizer, documents: list[str] = docs, seq_len: int = 8, val: float = 0.2) -> tuple[torch.Tensor, ...]:
        train_docs, val_docs = split_documents(documents, val)
        return pack_documents(tok, train_docs, seq_len), pack_documents(tok, val_docs, seq_len)

    def entries() -> set[str]:
        return {p.name for p in (tmp_path / "blocks").glob("*.pt")}

    first = packed_splits(tokenizer, docs, 8, 0.2, cache_dir=tmp_path)
    assert [t.tolist() for t in first] == [t.tolist() for t in fresh()] and len(entries()) == 1
    (entry,) = entries()
    again = packed_splits(tokenizer, docs, 8, 0.2, cache_dir=tmp_path)
    assert [t.dtype for t in again] == [torch.long, torch.long]
    assert [t.tolist() for t in again] == [t.tolist() for t in first] and entries() == {entry}

    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    packed_splits(AutoTokenizer.from_pretrained(tmp_path / "tok"), docs, 8, 0.2, cache_dir=tmp_path)
    assert entries() == {entry}  # the same tokenizer, reloaded: the same key

    other = letter_tokenizer("hgfedcba")  # other ids for the same letters
    changes = [(other, docs, 8, 0.2), (tokenizer, docs[:-1] + [docs[-1] + "a"], 8, 0.2), (tokenizer, docs, 16, 0.2),
               (tokenizer, docs, 8, 0.3)]
    for tok, documents, seq_len, val in changes:
        got = packed_splits(tok, documents, seq_len, val, cache_dir=tmp_path)
        assert [t.tolist() for t in got] == [t.tolist() for t in fresh(tok, documents, seq_len, val)]
    assert len(entries()) == 1 + len(changes)

    (tmp_path / "blocks" / entry).write_bytes(b"not a tensor file")
    damaged = packed_splits(tokenizer, docs, 8, 0.2, cache_dir=tmp_path)
    assert [t.tolist() for t in damaged] == [t.tolist() for t in first]
    assert [t.tolist() for t in torch.load(tmp_path / "blocks" / entry).values()] == [t.tolist() for t in first]


def test_finetune_parts_select_exactly_their_parameters(small_donor, large_donor) -> None:
    from splitllama.backend.hf import HFBackend, SplitModelSpec

    backend = HFBackend(SplitModelSpec(str(small_donor), str(large_donor), 2, 3), {})
    names = [n for n, _ in backend.model.named_parameters()]
    for parts, prefixes in ((["adapter"], ("model.adapter.",)), (["first"], ("model.layers_first.",)),
                            (["last"], ("model.layers_last.",)), (["embeddings", "head"], ("model.embed_tokens.", "lm_head.")),
                            (["all"], ("",))):
        chosen = backend.select_trainable(parts, None)
        assert chosen == [n for n in names if n.startswith(prefixes)], parts
        assert [n for n, p in backend.model.named_parameters() if p.requires_grad] == chosen
    with pytest.raises(ValueError, match="finetune.trainable"):
        # the identity adapter (a donor stitched with itself) has no parameters to train
        HFBackend(SplitModelSpec(str(large_donor), str(large_donor), 2, 3, adapter="identity"), {}).select_trainable(["adapter"], None)


def test_lora_targets_the_chosen_layers_and_merges_on_export(small_donor, large_donor) -> None:
    from splitllama.backend.hf import HFBackend, SplitModelSpec

    backend = HFBackend(SplitModelSpec(str(small_donor), str(large_donor), 2, 3), {})
    lora = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "down_proj"], "parts": ["last"]}
    chosen = backend.select_trainable(["adapter"], lora)
    lora_names = [n for n in chosen if "lora_" in n]
    assert len(lora_names) == 3 * 2 * 2  # 3 large-donor layers x (q_proj, down_proj) x (A, B)
    assert all("layers_last" in n and ("q_proj" in n or "down_proj" in n) for n in lora_names)
    assert len(chosen) - len(lora_names) == 2  # adapter weight and bias
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # as after training (B starts at zero)
    ids = torch.randint(0, 256, (2, 12))
    merged = backend.hf_model()
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, backend.logits(ids), atol=1e-5)


# ------------------------------------------------------------------ exact resume, in-process (run.py's wiring)
class BatchLog:
    """The training batches a fit took, in order (a Lightning callback)."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        outer = self

        class _Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
                outer.batches.append(batch["input_ids"].tolist())

        self.batches: list[list[list[int]]] = []
        self.callback = _Callback()


class SendSignal:
    """Send ``signum`` to this process when Lightning reaches hook ``hook`` after ``step`` steps."""

    def __init__(self, signum: int, hook: str, step: int) -> None:
        import lightning.pytorch as pl

        def send(trainer, *args) -> None:  # noqa: ANN001
            if trainer.global_step == step and not getattr(self, "sent", False):
                self.sent = True
                signal.raise_signal(signum)

        self.callback = type("SendSignalCallback", (pl.Callback,), {hook: lambda _self, trainer, *a: send(trainer)})()


def quick_fit(cache: Path, run_dir: Path, *overrides: str, resume: bool = False, signals=None, extra=()) -> tuple[float, list]:  # noqa: ANN001
    """Train as ``run.py debug=quick`` does (same pipeline pieces, checkpoints and stop callback),
    in this process; returns the final validation loss and the batches this fit consumed."""
    from splitllama.run.checks import validate
    from splitllama.run.data import make_datamodule
    from splitllama.run.donors import load_tokenizer, resolve_donors
    from splitllama.run.model import builds_per_rank, make_module, model_spec
    from splitllama.run.trainer import make_callbacks, make_trainer, seed_everything

    from tests.conftest import compose_run_config

    cfg = compose_run_config("debug=quick", "logger=none", f"paths.output_dir={run_dir}", f"paths.cache_dir={cache}", *overrides)
    validate(cfg)
    seed_everything(cfg.seed)
    donors = resolve_donors(cfg)
    data = make_datamodule(cfg, load_tokenizer(donors.path8b))
    data.setup("fit")
    module = make_module(cfg, model_spec(cfg, donors, calibration=data.train_blocks[: cfg.adapter.calibration_blocks]),
                           teacher_path=donors.path70b)
    log = BatchLog()
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    trainer = make_trainer(cfg, [], [*make_callbacks(cfg, signals), log.callback, *extra])
    if not builds_per_rank(cfg):
        module.configure_model()
    trainer.fit(module, data, ckpt_path=str(last) if resume else None)
    assert type(module.backend).__name__ == {"hf": "HFBackend", "megatron": "MegatronBackend"}[cfg.backend.name]
    return trainer.validate(module, data, verbose=False)[0]["val/loss"], log.batches


@pytest.fixture(scope="module")
def uninterrupted_quick_fit(embedded_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, list]:
    return quick_fit(embedded_cache, tmp_path_factory.mktemp("uninterrupted"))


# The stop points that differ around the validation at step 4 of 8 (val_check_interval=4): before it
# (step 3: test_a_signal_stops... SIGINT case, and test_run.py's resume through run.py), at it (step 4:
# the SIGTERM-in-validation case), after it (5) and with one step left (7).
@pytest.mark.parametrize("stop", [5, 7], ids=["after half", "last step"])
def test_resume_takes_the_same_batches_and_reaches_the_same_loss(
    embedded_cache: Path, tmp_path: Path, uninterrupted_quick_fit: tuple[float, list], stop: int
) -> None:
    """Stopped after ``stop`` of 8 steps and resumed from ``last.ckpt``: every batch once, in the
    uninterrupted order, and the same final validation loss in float32 (exactly, not approximately)."""
    full_loss, full_batches = uninterrupted_quick_fit
    _, first = quick_fit(embedded_cache, tmp_path, f"task.stop_after_steps={stop}")
    resumed_loss, rest = quick_fit(embedded_cache, tmp_path, resume=True)
    assert len(first) == stop and len(rest) == 8 - stop
    assert first + rest == full_batches
    assert resumed_loss == full_loss


@pytest.mark.parametrize(("signum", "hook", "step"), [
    (signal.SIGINT, "on_train_batch_start", 2),  # Ctrl-C inside a step: stop after it, with a checkpoint
    (signal.SIGTERM, "on_validation_start", 4),  # SIGTERM (SLURM) during validation: Lightning's SIGTERMException
], ids=["SIGINT in a step", "SIGTERM in validation"])
def test_a_signal_stops_with_a_checkpoint_that_resumes_exactly(
    embedded_cache: Path, tmp_path: Path, uninterrupted_quick_fit: tuple[float, list], signum: int, hook: str, step: int
) -> None:
    from splitllama.results import RunInterrupted, RunSignals

    full_loss, full_batches = uninterrupted_quick_fit
    signals = RunSignals()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals.install()
    try:
        with pytest.raises((RunInterrupted, SystemExit)):
            quick_fit(embedded_cache, tmp_path, signals=signals, extra=[SendSignal(signum, hook, step).callback])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert signals.received == signal.Signals(signum).name
    assert signals.checkpoint == str(tmp_path / "checkpoints" / "last.ckpt") and signals.step == step + (hook == "on_train_batch_start")
    resumed_loss, rest = quick_fit(embedded_cache, tmp_path, resume=True)
    assert rest == full_batches[signals.step:]
    assert resumed_loss == full_loss


def test_the_split_config_is_validated_once_per_run(embedded_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run.py task=assemble`` of the embedded debug donors, in this process: the SplitLlamaConfig validated from
    their recipe (before the donors are built) is the one the model is assembled from, given the built donors'
    paths, and nothing builds it again."""
    import importlib.util
    import json

    from splitllama.embedded import ensure_embedded_donors
    from splitllama.results import RunRecord

    from tests.conftest import REPO, compose_run_config, quick_recipe

    validated: list[SplitLlamaConfig] = []
    validate = SplitLlamaConfig._resolve_and_validate

    def counted(self: SplitLlamaConfig) -> None:
        validated.append(self)
        validate(self)

    monkeypatch.setattr(SplitLlamaConfig, "_resolve_and_validate", counted)
    entry = importlib.util.spec_from_file_location("run_entry", REPO / "run.py")
    run_entry = importlib.util.module_from_spec(entry)
    entry.loader.exec_module(run_entry)
    cfg = compose_run_config("debug=quick", "task=assemble", "logger=none", f"paths.output_dir={tmp_path}",
                             f"paths.cache_dir={embedded_cache}")
    run_entry.assemble(cfg, RunRecord(tmp_path, task="assemble", config={}))
    assert len(validated) == 1
    built = ensure_embedded_donors(quick_recipe(), embedded_cache, progress=False)
    saved = json.loads((tmp_path / "hf_model" / "config.json").read_text())
    assert (saved["path8b"], saved["path70b"]) == (str(built.path8b), str(built.path70b))
    assert saved["config_8b"]["architectures"] == ["LlamaForCausalLM"]  # the donors' own config.json, as before


def test_built_embedded_donors_must_be_what_their_recipe_validated(embedded_cache: Path, tmp_path: Path) -> None:
    """The split config validated from the recipe is carried only onto donors whose config.json is that recipe's."""
    import dataclasses
    import json

    from splitllama.run.checks import validate
    from splitllama.run.donors import resolve_donors, with_built_donors
    from splitllama.errors import RunConfigError

    from tests.conftest import compose_run_config

    cfg = compose_run_config("debug=quick", f"paths.cache_dir={embedded_cache}")
    donors = resolve_donors(cfg)
    config = json.loads((Path(donors.path70b) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(RunConfigError, match=r"^donors.embedded: the built large donor \(.*\) has rms_norm_eps=1e-06, but its recipe gives 1e-05"):
        with_built_donors(validate(cfg), dataclasses.replace(donors, path70b=str(tmp_path)))
    split = with_built_donors(validate(cfg), donors)
    assert (split.path8b, split.path70b) == (donors.path8b, donors.path70b) and split.config_70b.architectures == ["LlamaForCausalLM"]
