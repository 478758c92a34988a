"""Training objectives: next-token loss, distillation from the large donor, or a weighted sum.

All losses are means over predicted tokens (position ``t`` predicts token ``t + 1``), so the
next-token loss here equals the ``loss`` a transformers causal LM returns for ``labels=input_ids``.
Distillation is ``KL(teacher || student)`` of the temperature-softened next-token distributions,
scaled by ``T**2`` (Hinton et al.) so that its gradient size does not depend on the temperature.
The teacher is the full large donor, frozen, with the same vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, :-1]`` against ``input_ids[:, 1:]`` (computed in float32)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over predicted tokens of ``T**2 * KL(softmax(teacher/T) || softmax(student/T))``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (the donors must share one vocabulary)"
        )
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1).reshape(-1, vocab)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1).reshape(-1, vocab)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


@dataclass(frozen=True)
class Objective:
    """``kind`` is ``lm``, ``distill`` or ``mixed`` (``lm_weight * lm + distill_weight * distill``)."""

    kind: str = "lm"
    lm_weight: float = 1.0
    distill_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        # instantiated from the run config, ``kind`` arrives as the schema's enum member
        object.__setattr__(self, "kind", getattr(self.kind, "name", self.kind))

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("distill", "mixed")

    def __call__(
        self, logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": ..., "lm_loss": ..., "distill_loss": ...}`` (the parts that apply)."""
        parts: dict[str, torch.Tensor] = {"lm_loss": next_token_loss(logits, input_ids)}
        if self.needs_teacher:
            if teacher_logits is None:
                raise ValueError(f"objective.kind={self.kind} needs the teacher's logits")
            parts["distill_loss"] = distillation_loss(logits, teacher_logits, self.temperature)
        if self.kind == "lm":
            parts["loss"] = parts["lm_loss"]
        elif self.kind == "distill":
            parts["loss"] = parts["distill_loss"]
        elif self.kind == "mixed":
            parts["loss"] = self.lm_weight * parts["lm_loss"] + self.distill_weight * parts["distill_loss"]
        else:
            raise ValueError(f"objective.kind={self.kind}: must be one of lm, distill, mixed")
        return parts


__all__ = ["Objective", "distillation_loss", "next_token_loss"]
