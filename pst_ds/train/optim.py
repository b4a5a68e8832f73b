"""The optimizer and its schedule: AdamW over the trainable parameters, one learning rate per job.

    method       PST's weight update (U, V); a baseline's own parameters      train.lr
    importance   PST's importance factors (A, B, R, C)                        train.importance_lr
    scores       movement / smp per-weight scores                            train.score_lr
    thresholds   learned thresholds' logits (pst.mask=threshold)             train.threshold_lr
    head         pst.trainable_modules (e.g. a new task head)                train.head_lr

A side rate of 0 means train.lr. The schedule is the Trainer's: linear warm-up then linear decay.
"""

from __future__ import annotations

from torch import nn

from ..config import PSTConfig, TrainConfig
from ..layers.inject import head_parameters, iter_injected

JOBS = ("method", "importance", "scores", "thresholds", "head")


def parameter_groups(model: nn.Module, pst: PSTConfig) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` by the job (and so the learning rate) they have:
    what each injected layer declares, the modules of pst.trainable_modules, and the rest
    (a dense run's whole model) with the method's own rate."""
    group_of = {id(p): "head" for p in head_parameters(model, pst)}
    for _, layer in iter_injected(model):
        for job, params in layer.parameter_groups().items():
            group_of.update({id(p): job for p in params})
    groups: dict[str, list[nn.Parameter]] = {job: [] for job in JOBS}
    for p in model.parameters():
        if p.requires_grad:
            groups[group_of.get(id(p), "method")].append(p)
    return groups


def optimizer_groups(model: nn.Module, pst: PSTConfig, train: TrainConfig, lr: float) -> list[dict]:
    """One torch param group per job that has parameters, at its own rate (``lr`` for the
    method's and for a side rate of 0). ``lr`` is train.lr, or an HF Trainer's learning_rate."""
    rates = {
        "method": lr,
        "importance": train.importance_lr,
        "scores": train.score_lr,
        "thresholds": train.threshold_lr,
        "head": train.head_lr,
    }
    return [
        {"params": params, "lr": rates[name] or lr}
        for name, params in parameter_groups(model, pst).items()
        if params
    ]
