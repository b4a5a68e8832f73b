"""Mask selection: the exact per-matrix top-k of an importance score, with a straight-through gradient."""

from __future__ import annotations

import torch


def num_pruned(numel: int, sparsity: float) -> int:
    """How many entries a matrix of ``numel`` entries loses at ``sparsity`` (the release's rule)."""
    return int(numel * sparsity)


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask that drops exactly ``int(numel * sparsity)`` entries with the smallest scores.

    Found by selection (``kthvalue``), not a sort. Ties at the threshold are broken by flat
    index, lower index pruned first, so the mask is a deterministic function of ``scores``:
    every rank that holds the same scores computes the same mask.
    """
    k = num_pruned(scores.numel(), sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    tied = flat == threshold
    # Of the entries equal to the threshold, prune just enough (the first ones) to reach k.
    prune_tied = tied & (tied.cumsum(0) <= k - below.sum())
    return ~(below | prune_tied).reshape(scores.shape)


class StraightThroughTopK(torch.autograd.Function):
    """M = top-k(S) in the forward; dL/dS = dL/dM in the backward (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        return topk_mask(scores, sparsity).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_mask, None
