"""``pst.init=auto``: the warm start that measured best for the run's sparsity and mask.

Chosen from the quality grid of issue 21 (docs/results.md, "Quality past the one-shot
methods", "70%: the start"): 30-step runs of SmolLM2-135M on Austen, judged on validation and on three texts
it never trained on (Moby Dick, film reviews, the GPL).

    70% (top-k)   SparseGPT's mask and updated weights: 0.62 / 0.55 / 0.52 / 0.56 of one-shot
                  SparseGPT's perplexity after 30 steps, against 0.72 / 0.70 / 0.58 / 0.56
                  from Wanda's mask (the only 70% rows measured so far, one model)
    otherwise     Wanda's mask (the default before issue 21) until a grid says otherwise

A start the run cannot use is never chosen: a method that takes no warm start (movement, smp,
lora, ...) starts from magnitude; SparseGPT cannot choose V:N:M's per-block columns; Wanda's
mask stays in force only through activation importance. A run that distils after SparseGPT's
start keeps a copy of the original weights for its teacher (layers/base.py, DenseTeacher):
at 70% it measured better still (0.59 / 0.54 / 0.45 / 0.52 with train.distill.weight=0.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import PSTConfig

AUTO = "auto"
# Above this final sparsity (top-k and learned thresholds) SparseGPT's start measured best.
SPARSEGPT_ABOVE = 0.5


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
