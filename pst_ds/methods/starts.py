"""``pst.init=auto`` and ``train.distill.weight=auto``: the warm start, and the distillation
after it, that measured best for the run's sparsity and mask.

Chosen from the quality grid of issue 21 (docs/results.md, "Quality past the one-shot
methods"): 30-step runs on Austen of SmolLM2-135M and gemma-3-270m, judged on validation and
on three texts they never trained on (Moby Dick, film reviews, the GPL).

    70% (top-k)   SparseGPT's mask and updated weights: on SmolLM2 0.62 / 0.55 / 0.52 / 0.56 of
                  one-shot SparseGPT's perplexity after 30 steps, against 0.72 / 0.70 / 0.58 /
                  0.56 from Wanda's mask
    50% (top-k)   Wanda's mask: 51.24 / 64.98 / 140.70 / 49.12 on SmolLM2, against 57.43 / 65.26 /
                  162.46 / 68.23 from SparseGPT's
    2:4, V:N:M    Wanda's mask (SparseGPT cannot choose V:N:M's per-block columns)

After SparseGPT's start, training drifts from the dense model out of domain: on gemma at 70%
the GPL went from one-shot's 185.40 to 273.92. Distilling from the original weights (a copy
kept for the teacher, layers/base.py DenseTeacher) held it at 208.72 and was better on every
text of both models, so ``auto`` distils there. After Wanda's start (W untouched) it is a
trade (better out of domain, worse in it, docs/results.md), and ``auto`` saves the teacher
pass. A start the run cannot use is never chosen: a method that takes no warm start
(movement, smp, lora, ...) starts from magnitude; Wanda's mask stays in force only through
activation importance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import PSTConfig
    from .base import Method

AUTO = "auto"
# Above this final sparsity (top-k and learned thresholds) SparseGPT's start measured best.
SPARSEGPT_ABOVE = 0.5
# Distillation's weight after a start that rewrote the weights (SparseGPT's), from the original
# model: at 70% it measured better on every text of both models (docs/results.md).
DISTILL_AFTER_REWRITE = 0.5


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


def best_distill_weight(pst: PSTConfig, method: type[Method], start: type[Method]) -> float:
    """The train.distill.weight that ``auto`` stands for in a run of ``method`` from the warm start
    ``start`` (pst.init, resolved): DISTILL_AFTER_REWRITE after a start that rewrote the weights,
    where training drifted furthest from the dense model out of domain; 0 (no teacher pass)
    otherwise, where it measured a trade: better out of domain, worse in it."""
    teaches = method.trains and method.frozen_backbone and not pst.trainable_modules
    return DISTILL_AFTER_REWRITE if teaches and start.calibrates and start.rewrites_backbone else 0.0
