"""Distillation from the frozen dense backbone, at the cost of one forward without autograd.

PST (like smp and LoRA) never changes W, so the dense teacher is already in memory: it is the
same model with every injected layer switched to y = x W^T + b (no mask, no update). Under
ZeRO-3 the teacher pass gathers the same shards as the student's; no second model is held.

    loss = (1 - weight) CE(student, labels) + weight T^2 KL(softmax(t / T) || softmax(s / T))

with the KL summed over the vocabulary (or classes) and taken at the positions the hard loss
counts: where a causal LM's next token (or an example's class) is labelled. Both terms are
averaged over the same count: the labelled tokens of the micro-batch, or ``num_items`` (the
Trainer's ``num_items_in_batch``: the labelled tokens of the whole accumulated batch). T^2 keeps
the soft term's gradient on the scale of the hard one (Hinton et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DistillConfig
from ..io.data import labelled_positions
from ..layers.base import dense_forward as teacher_forward

__all__ = ["distillation_loss", "distilled", "soft_kl", "teacher_forward"]


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    counted: torch.Tensor | None = None,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """KL(teacher || student) at ``temperature`` (fp32), summed over the last dim, over the
    positions ``counted`` (all when None), divided by ``num_items`` (their count when None)."""
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if counted is None:
        counted = torch.ones_like(per_position)
    counted = counted.reshape(-1).to(per_position)  # a weight, not an index: no host sync in a step
    total = (per_position * counted).sum()
    return total / (counted.sum() if num_items is None else num_items)


def distillation_loss(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: float,
    temperature: float,
    counted: torch.Tensor | None = None,
    num_items: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((1 - weight) hard_loss + weight T^2 KL, the KL) for the student's logits; the KL over
    ``counted`` positions, per ``num_items`` (see soft_kl)."""
    kl = soft_kl(student_logits, teacher_logits, temperature, counted, num_items)
    return (1 - weight) * hard_loss + weight * temperature**2 * kl, kl.detach()


def distilled(
    model: Callable[..., Any],
    batch: dict[str, torch.Tensor],
    distill: DistillConfig,
    num_items: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Any]:
    """(the distillation loss, the student's output) of ``model`` on ``batch``: a teacher pass
    through the frozen dense backbone without autograd, then the student's. With ``num_items``
    (the model takes it, as transformers' models do) both terms are sums over this micro-batch's
    labelled tokens divided by it; without, means over them."""
    with torch.no_grad(), teacher_forward():
        teacher_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    output = model(**batch, **extra)
    counted = labelled_positions(batch["labels"], output.logits)
    loss, _ = distillation_loss(
        output.loss, output.logits, teacher_logits, distill.weight, distill.temperature, counted, num_items
    )
    return loss, output
