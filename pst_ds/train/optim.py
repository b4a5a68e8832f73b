"""The optimizer and its schedule: AdamW over the trainable parameters, one learning rate per job.

    method       PST's weight update (U, V); a baseline's own parameters      train.lr
    importance   PST's importance factors (A, B, R, C)                        train.importance_lr
    scores       movement / smp per-weight scores                            train.score_lr
    thresholds   learned thresholds' logits (pst.mask=threshold)             train.threshold_lr
    head         pst.trainable_modules (e.g. a new task head)                train.head_lr

A side rate of 0 means train.lr. The schedule is transformers' linear warm-up then linear decay.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from ..config import PSTConfig, TrainConfig
from ..layers.base import SparseLinear
from ..layers.inject import head_parameters

IMPORTANCE_FACTORS = ("A", "B", "R", "C")


def parameter_groups(
    model: nn.Module, layers: list[SparseLinear], pst: PSTConfig
) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` by the job (and so the learning rate) they have."""
    group_of = {id(p): "head" for p in head_parameters(model, pst)}
    for layer in layers:
        for name in IMPORTANCE_FACTORS:
            if hasattr(layer, name):
                group_of[id(getattr(layer, name))] = "importance"
        if hasattr(layer, "scores"):
            group_of[id(layer.scores)] = "scores"
        if hasattr(layer, "threshold_logit"):
            group_of[id(layer.threshold_logit)] = "thresholds"
    groups: dict[str, list[nn.Parameter]] = {
        n: [] for n in ("method", "importance", "scores", "thresholds", "head")
    }
    for p in model.parameters():
        if p.requires_grad:
            groups[group_of.get(id(p), "method")].append(p)
    return groups


def build_optimizer(
    model: nn.Module, layers: list[SparseLinear], pst: PSTConfig, train: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with one group per job (empty ones left out) and the linear warm-up/decay schedule."""
    rates = {
        "method": train.lr,
        "importance": train.importance_lr,
        "scores": train.score_lr,
        "thresholds": train.threshold_lr,
        "head": train.head_lr,
    }
    groups = [
        {"params": params, "lr": rates[name] or train.lr}
        for name, params in parameter_groups(model, layers, pst).items()
        if params
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps)
    return optimizer, schedule
