"""Distillation from the frozen dense backbone, at the cost of one forward without autograd.

PST (like smp and LoRA) never changes W, so the dense teacher is already in memory: it is the
same model with every injected layer switched to y = x W^T + b (no mask, no update). Under
ZeRO-3 the teacher pass gathers the same shards as the student's; no second model is held.

    loss = (1 - weight) CE(student, labels) + weight T^2 KL(softmax(t / T) || softmax(s / T))

with the KL summed over the vocabulary (or classes) and averaged over tokens (or examples);
T^2 keeps the soft term's gradient on the scale of the hard one (Hinton et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DistillConfig
from ..layers.base import dense_forward as teacher_forward

__all__ = ["distillation_loss", "distilled", "soft_kl", "teacher_forward"]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, summed over the last dim, averaged over the rest (fp32)."""
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def distillation_loss(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((1 - weight) hard_loss + weight T^2 KL, the KL) for the student's logits."""
    kl = soft_kl(student_logits, teacher_logits, temperature)
    return (1 - weight) * hard_loss + weight * temperature**2 * kl, kl.detach()


def distilled(
    model: Callable[..., Any], batch: dict[str, torch.Tensor], distill: DistillConfig
) -> tuple[torch.Tensor, Any]:
    """(the distillation loss, the student's output) of ``model`` on ``batch``: a teacher pass
    through the frozen dense backbone without autograd, then the student's."""
    with torch.no_grad(), teacher_forward():
        teacher_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    output = model(**batch)
    loss, _ = distillation_loss(
        output.loss, output.logits, teacher_logits, distill.weight, distill.temperature
    )
    return loss, output
