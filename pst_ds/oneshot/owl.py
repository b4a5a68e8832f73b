"""OWL (Yin et al., ICML 2024): each block's own sparsity, from its share of activation outliers.

A block whose Wanda scores |W_ij| * ||x_j|| hold more outliers (scores above ``m`` times the
block's mean) keeps more of its weights. With D_l the outlier share of block l (in %):

    D'_l = (D_l - min D) / (max D - min D) * 2 lambda      spread over [0, 2 lambda]
    s_l  = 1 - (D'_l - mean D' + 1 - s)                    mean over blocks: the target s

so every block lies within lambda of the target and the blocks' mean is the target (the blocks
of a decoder stack are the same size, so the model prunes the target's share). Every targeted
layer of a block gets its block's sparsity. The norms come from one pass of the calibration
blocks through the dense model (the paper's and llm-compressor's ``sparsity_profile="owl"``).

Under ZeRO-3 each rank runs its share of the batches and the sums are all-reduced; each block's
weights are gathered whole, one block at a time, so every rank computes the same profile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import deepspeed
import torch

from ..layers.importance import fold_step
from .calibrate import CalibrationInputs, block_of, in_blocks, my_share

if TYPE_CHECKING:
    from ..methods.base import Calibration


def owl_sparsities(outlier_shares: list[float], sparsity: float, lmbda: float) -> list[float]:
    """Each block's sparsity from its outlier share (%), the target ``sparsity`` and ``lmbda``."""
    shares = torch.tensor(outlier_shares, dtype=torch.float64)
    spread = float(shares.max() - shares.min())
    scaled = (shares - shares.min()) / spread * 2 * lmbda if spread > 0 else torch.zeros_like(shares)
    keep = scaled - scaled.mean() + (1 - sparsity)
    return [float(s) for s in (1 - keep).clamp(0.0, 1.0)]


def outlier_share(weights: list[torch.Tensor], norms: list[torch.Tensor], m: float) -> float:
    """The share (%) of a block's Wanda scores above ``m`` times their mean, over all its layers."""
    scores = [weight.float().abs() * norm[None, :] for weight, norm in zip(weights, norms, strict=True)]
    total = sum(score.numel() for score in scores)
    threshold = m * sum(float(score.sum(dtype=torch.float64)) for score in scores) / total
    return 100.0 * sum(int((score > threshold).sum()) for score in scores) / total


def owl_profile(calibration: Calibration, sparsity: float, m: float, lmbda: float) -> dict[str, float]:
    """Each targeted layer's sparsity under OWL when the model's is ``sparsity``. Collective."""
    layers = calibration.layers
    calibration.put_in_force(layers, 0.0)  # the outliers of the dense model
    seen = CalibrationInputs(layers, hessians=False)
    with torch.no_grad():
        for index, counted in my_share(len(calibration.batches)):
            seen.active = counted
            calibration.forward(calibration.batches[index if counted else 0])
    seen.remove()
    norms = {
        name: torch.zeros(layer.in_features, device=layer.pruned.device) for name, layer in layers.items()
    }
    fold_step(((norms[name], seen.stats[name]) for name in layers), weight=1.0)  # the mean of x^2
    groups = in_blocks(layers, sequential=True)
    shares = []
    for names in groups:
        block = [layers[name] for name in names]
        with torch.no_grad(), deepspeed.zero.GatheredParameters([layer.weight for layer in block]):
            weights = [layer.oriented_weight() for layer in block]
            shares.append(outlier_share(weights, [norms[name].sqrt() for name in names], m))
    per_block = owl_sparsities(shares, sparsity, lmbda)
    calibration.progress(
        "owl: block sparsities "
        + ", ".join(f"{block_of(names[0])} {s:.3f}" for names, s in zip(groups, per_block, strict=True))
    )
    return {name: s for names, s in zip(groups, per_block, strict=True) for name in names}
