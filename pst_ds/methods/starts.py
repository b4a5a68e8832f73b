"""``pst.init=auto`` and ``train.distill.weight=auto``: the warm start that measured best for the
run's sparsity and mask, and the distillation that measured best after it.

Chosen from the quality grid of issue 21 (docs/archive/results-history.md, "Quality past the one-shot
methods"): 30-step runs on Austen of SmolLM2-135M and gemma-3-270m, judged on validation and
on three texts they never trained on (Moby Dick, film reviews, the GPL).

    70% (top-k)   SparseGPT's mask and updated weights: on SmolLM2 0.62 / 0.55 / 0.52 / 0.56 of
                  one-shot SparseGPT's perplexity after 30 steps, against 0.72 / 0.70 / 0.58 /
                  0.56 from Wanda's mask
    50% (top-k)   Wanda's mask: 51.24 / 64.98 / 140.70 / 49.12 on SmolLM2, against 57.43 / 65.26 /
                  162.46 / 68.23 from SparseGPT's
    2:4, V:N:M    Wanda's mask (SparseGPT cannot choose V:N:M's per-block columns)

Training on one text drifts from the dense model out of it. Distilling from the original model
(the frozen backbone, or after SparseGPT's start a copy of the original weights kept for the
teacher, layers/base.py DenseTeacher) held it on both models after every start measured: at
70% from SparseGPT's start gemma's GPL went 273.92 → 208.72; at 50% from Wanda's start, with
the factors in weight units, gemma's reviews / GPL 137.25 / 43.04 → 122.15 / 37.35 and
SmolLM2's 141.44 / 47.68 → 128.13 / 45.96, for about 2% in domain. So ``auto`` distils
whenever the backbone stays frozen. A start the run cannot use is never chosen: a method that
takes no warm start (movement, smp, lora, ...) starts from magnitude; Wanda's mask stays in
force only through activation importance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import PSTConfig
    from .base import Method

AUTO = "auto"
# Above this final sparsity (top-k and learned thresholds) SparseGPT's start measured best.
SPARSEGPT_ABOVE = 0.5
# Distillation's weight from the original model, wherever the backbone stays frozen: it measured
# better out of domain after both starts, on both models (docs/archive/results-history.md).
DISTILL_WEIGHT = 0.5


def best_start(pst: PSTConfig, warm_startable: bool = True) -> str:
    """The pst.init that ``pst.init=auto`` stands for in a run with ``pst``, of a method that may
    (``warm_startable``) or may not start from a one-shot mask."""
    if not warm_startable:
        return "magnitude"
    kind = pst.kind()
    if pst.importance != "activation":  # Wanda's mask would not stay in force
        return "sparsegpt" if kind.obs_prunable else "magnitude"
    if kind.obs_prunable and not kind.grouped and pst.final_sparsity > SPARSEGPT_ABOVE:
        return "sparsegpt"
    return "wanda"


def best_distill_weight(pst: PSTConfig, method: type[Method]) -> float:
    """The train.distill.weight that ``auto`` stands for in a run of ``method``: DISTILL_WEIGHT
    where the original model can teach (the method trains and the backbone stays frozen, or is
    kept as a copy where a warm start rewrites it), 0 where it cannot (a method that trains W,
    a trainable head the teacher does not have, a one-shot run)."""
    teaches = method.trains and method.frozen_backbone and not pst.trainable_modules
    return DISTILL_WEIGHT if teaches else 0.0
