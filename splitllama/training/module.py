"""The LightningModule that trains a split model, whatever backend runs it.

The module asks its backend object (:class:`splitllama.backend.spec.BackendSpec`) for the model (in
``configure_model``, so strategies such as FSDP can wrap it), freezes all but what the config
says trains, and optimises the chosen objective with AdamW, linear warmup and cosine decay.

Per step it logs ``train/loss`` (and its parts), ``train/lr``, ``train/tokens_per_s`` and
``train/grad_norm`` (before clipping); per validation ``val/loss`` (next-token loss, averaged
over every predicted token) and ``val/ppl``; once ``params/total``, ``params/trainable`` and
``flops/per_token``.

Checkpoints hold only the trainable tensors (the frozen ones come from the donors when the
model is rebuilt), the optimizer and scheduler, and the RNG states; with the data module's
position this makes ``ckpt_path=...`` continue a run exactly.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from ..backend.interface import SplitBackend, SplitModelSpec
from ..backend.spec import BackendSpec
from ..errors import RunConfigError
from ..flops import count_flops_per_token
from .objectives import Objective, next_token_loss

logger = logging.getLogger(__name__)

# Lightning cannot see that our data module resumes the training stream itself (its sampler keeps
# the run's full length and starts at the saved position, matching the in-epoch batch index
# Lightning restores; see data.py). tests/test_training.py checks resumed == uninterrupted exactly.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
# Manual optimisation (megatron's schedule) checkpoints the state after the optimizer step, as the
# automatic loop does; that is what resuming needs, so Lightning's advice to save the earlier state does not apply.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")


@dataclass
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    total_steps: int = 100
    #: gradient clipping for backends that train with manual optimisation (megatron: the norm over
    #: all model-parallel shards); others clip through the Trainer's ``gradient_clip_val``
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  (a list when instantiated from the config)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SplitLlamaLitModule(pl.LightningModule):
    """Trains the split model that ``backend.build(spec, backend_options)`` returns.

    Args:
        spec: what to build (donor paths and layers, adapter, or a saved model directory).
        backend, backend_options: which backend (a :class:`~splitllama.backend.spec.BackendSpec`,
            default ``hf``) and the options its model takes.
        trainable: parts that train (adapter, first, last, embeddings, norm, head, all).
        lora: ``finetune.lora`` settings (peft LoRA on donor layers) or ``None``.
        objective: the loss; a distillation objective loads the teacher from ``teacher_path``.
        optim: AdamW and schedule settings.
        seq_len: training sequence length (for the FLOPs count).
        manual_schedule: the backend runs forward and backward itself over micro-batches
            (``backend.run_schedule``: megatron's schedule, pipelined under PP); the module then
            uses manual optimisation: one ``run_schedule``, clip, optimizer and scheduler step per batch.
        micro_batch_size: with ``manual_schedule``, each batch is split into micro-batches of this
            size (``None``: one micro-batch); a pipeline needs several to keep its stages busy.
    """

    def __init__(
        self,
        spec: SplitModelSpec,
        *,
        backend: BackendSpec | None = None,
        backend_options: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
        lora: dict[str, Any] | None = None,
        objective: Objective | None = None,
        optim: OptimSettings | None = None,
        teacher_path: str | None = None,
        seq_len: int = 256,
        manual_schedule: bool = False,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = not manual_schedule
        self.micro_batch_size = micro_batch_size
        self.spec = spec
        self.backend_spec = backend or BackendSpec()
        self.backend_options = dict(backend_options or {})
        self.trainable_parts = list(trainable if trainable is not None else ["adapter"])
        self.lora = lora
        self.objective = objective or Objective()
        self.optim = optim or OptimSettings()
        self.teacher_path = teacher_path
        self.seq_len = seq_len
        self.backend: SplitBackend | None = None
        self.trainable_names: list[str] = []
        self._teacher: list[torch.nn.Module] = []  # a list keeps the frozen teacher out of state_dict
        self._val_sum = 0.0
        self._val_count = 0
        self._val_distill_sum = 0.0
        self._step_started = 0.0
        #: (global step, validation loss) of the newest validation pass
        self.last_validation: tuple[int, float] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._parallelized = False
        self.strict_loading = False  # checkpoints hold only trainable tensors; checked in on_load_checkpoint

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the model (once), then shard it once the strategy has a device mesh (``parallel=fsdp``).

        run.py builds before the Trainer starts (bad donors fail early); Lightning calls this
        again inside ``fit``/``validate``, where a model-parallel strategy has set ``device_mesh``.
        """
        if self.backend is None:
            self.backend = self.backend_spec.build(self.spec, self.backend_options)
            self.trainable_names = self.backend.select_trainable(self.trainable_parts, self.lora)
            self.model = self.backend.model  # registered as a submodule: Lightning moves, wraps and saves it
            self.model.train()  # assembly returns eval mode; Lightning keeps a module's mode when fitting
            if self.objective.needs_teacher:
                self._teacher = [load_teacher(self.teacher_path, self.spec.dtype, self.spec.attn_implementation)]
        mesh = self.device_mesh
        if mesh is not None and not self._parallelized:
            self.backend.parallelize(mesh["data_parallel"], self.backend_options)
            self.model = self.backend.model
            self._parallelized = True

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameters of the whole model (a model-parallel backend counts across its shards)."""
        return self.backend.parameter_counts()

    def flops(self) -> dict[str, float]:
        """Training FLOPs per token, the teacher's forward included when the objective distils."""
        return count_flops_per_token(self.backend.config, self.seq_len, teacher=self.objective.needs_teacher)

    # ------------------------------------------------------------------ steps
    def _teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        teacher = self.teacher
        if teacher is None:
            return None
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            return teacher(input_ids=input_ids, use_cache=False).logits

    def on_fit_start(self) -> None:
        counts, flops = self.parameter_counts(), self.flops()
        metrics = {
            "params/total": float(counts["total"]), "params/trainable": float(counts["trainable"]),
            "flops/train_per_token": flops["train_flops_per_token"], "flops/forward_per_token": flops["forward_flops_per_token"],
        }
        for lg in self.loggers:
            lg.log_metrics(metrics, step=self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # continue the interrupted run's random stream exactly
            torch.set_rng_state(self._rng_to_restore["torch"])
            if torch.cuda.is_available() and self._rng_to_restore.get("cuda") is not None:
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:
            return self._schedule_training_step(batch)
        input_ids = batch["input_ids"]
        logits = self.backend.logits(input_ids)
        parts = self.objective(logits, input_ids, self._teacher_logits(input_ids))
        size = input_ids.shape[0]
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=size)
        if self.objective.kind != "lm":
            self.log("train/lm_loss", parts["lm_loss"], batch_size=size)
            self.log("train/distill_loss", parts["distill_loss"], batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return parts["loss"]

    # ------------------------------------------------------------------ backends that run their own schedule
    def _loss_part_names(self) -> tuple[str, ...]:
        return ("loss",) if self.objective.kind == "lm" else ("loss", "lm_loss", "distill_loss")

    def _schedule_loss_fn(self) -> Any:
        """``None`` for the next-token objective (the backend's own loss, vocab-parallel, no logits gathered)."""
        if self.objective.kind == "lm":
            return None

        def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            input_ids = batch["input_ids"]
            return self.objective(logits, input_ids, self._teacher_logits(input_ids))

        return loss_fn

    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Equal micro-batches (a pipeline's messages have one shape): the largest size dividing the batch."""
        input_ids = batch["input_ids"]
        size = math.gcd(input_ids.shape[0], self.micro_batch_size or input_ids.shape[0])
        return [{"input_ids": chunk} for chunk in input_ids.split(size)]

    def _schedule_training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        optimizer = self.optimizers()
        parts = self.backend.run_schedule(
            self._micro_batches(batch), loss_fn=self._schedule_loss_fn(), parts=self._loss_part_names()
        )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = self.backend.clip_grad_norm(params, self.optim.max_grad_norm)
        size = batch["input_ids"].shape[0]
        self.log("train/grad_norm", norm, batch_size=1)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=size)
        if self.objective.kind != "lm":
            self.log("train/lm_loss", parts["lm_loss"], batch_size=size)
            self.log("train/distill_loss", parts["distill_loss"], batch_size=size)
        return parts["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic_optimization:
            return  # logged by _schedule_training_step (the norm over all model-parallel shards)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
        self.log("train/grad_norm", norm, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = batch["input_ids"].numel() * self.data_parallel_size()
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), batch_size=1)

    def data_parallel_size(self) -> int:
        """Replicas that see different data (megatron: the DP group; TP/PP ranks share a batch)."""
        shard = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
        return int(shard["num_replicas"]) if shard else self.trainer.world_size

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count, self._val_distill_sum = 0.0, 0, 0.0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        input_ids = batch["input_ids"]
        n = input_ids.shape[0] * (input_ids.shape[1] - 1)
        if not self.automatic_optimization:
            parts = self.backend.run_schedule(
                self._micro_batches(batch), loss_fn=self._schedule_loss_fn(), parts=self._loss_part_names(), forward_only=True
            )
            self._val_sum += parts["loss" if self.objective.kind == "lm" else "lm_loss"].item() * n
            self._val_count += n
            if "distill_loss" in parts:
                self._val_distill_sum += parts["distill_loss"].item() * n
            return
        logits = self.backend.logits(input_ids)
        self._val_sum += next_token_loss(logits, input_ids).item() * n
        self._val_count += n
        teacher_logits = self._teacher_logits(input_ids)
        if teacher_logits is not None:
            from .objectives import distillation_loss

            self._val_distill_sum += distillation_loss(logits, teacher_logits, self.objective.temperature).item() * n

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val_sum, float(self._val_count), self._val_distill_sum], dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self.trainer.world_size > 1 else totals
        if totals[1] == 0:
            return
        loss = (totals[0] / totals[1]).item()
        self.last_validation = (self.global_step, loss)
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=False)
        if self.teacher is not None:
            self.log("val/distill_loss", (totals[2] / totals[1]).item(), sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        if not decay and not no_decay and not self.automatic_optimization:
            # a pipeline stage that trains nothing (the adapter is on another stage) still steps an
            # optimizer and scheduler like its peers: one empty placeholder keeps AdamW constructible
            self._placeholder = [torch.nn.Parameter(torch.zeros(0, device=self.device))]
            no_decay = self._placeholder
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps
        )
        settings = self.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, settings.warmup_steps, settings.total_steps, settings.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n in self.trainable_names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["splitllama"] = {
            "trainable": sorted(trainable),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {f"model.{n}" for n in self.trainable_names}
        missing = sorted(expected - set(checkpoint.get("state_dict", {})))
        if missing:
            raise RunConfigError(
                f"ckpt_path: the checkpoint lacks {len(missing)} trainable tensor(s) of this run ({missing[:5]}...): it was "
                "made with other finetune.trainable / finetune.lora / adapter settings; resume with the settings it was trained "
                "with (its run directory's .hydra/config.yaml), or start a new run without ckpt_path"
            )
        self._rng_to_restore = checkpoint.get("splitllama", {}).get("rng")


def load_teacher(path: str | None, dtype: str = "float32", attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The distillation teacher: the full large donor, frozen, in eval mode."""
    if path is None:
        raise RunConfigError("objective.kind: distillation needs the large donor (donors.path70b) as teacher; give both donors "
                             "(or none, for the embedded tiny donors), or train with objective=lm")
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    teacher.eval().requires_grad_(False)
    return teacher


__all__ = ["OptimSettings", "SplitLlamaLitModule", "count_flops_per_token", "load_teacher", "warmup_cosine"]
