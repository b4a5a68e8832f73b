"""Importance's data term: |W'| (magnitude), or |W'| scaled by each input's norm (activation).

Activation is Wanda's score |W_ij| * ||x_j||. Each pruned layer keeps one buffer ``input_sq``
of ``in`` numbers: the mean of x_j^2 over the tokens its forward saw during the dense warm-up
(the steps the schedule holds at pst.initial_sparsity, at least the first). S then uses

    a_j = sqrt(input_sq_j) / mean_j sqrt(input_sq_j)        S = a * |W'| + ...

normalised to mean 1 so that S keeps the scale of |W'| (and of the A B, R, C terms). Each
step's sums are all-reduced (every rank then holds the same buffer) and folded into a running
mean over the warm-up's steps; with pst.activation_ema > 0 they go on as a moving average
after it. O(in) memory per layer, no trainable parameter, nothing weight-sized.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def column_scale(input_sq: torch.Tensor) -> torch.Tensor:
    """a_j = ||x_j|| / mean ||x_j|| (fp32); all ones before anything was gathered."""
    norm = input_sq.float().clamp(min=0).sqrt()
    mean = norm.mean()
    return torch.where(mean > 0, norm / mean, 1.0)  # a test on the device: no host sync


class InputStatistics:
    """This step's sum of x_j^2 and token count for one layer (fp32, not saved: a step's worth)."""

    def __init__(self) -> None:
        self.square_sum: torch.Tensor | None = None
        self.tokens = 0

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        square_sum = flat.pow(2).sum(0)
        self.square_sum = square_sum if self.square_sum is None else self.square_sum + square_sum
        self.tokens += flat.shape[0]


def fold_step(layers: Iterable[tuple[torch.Tensor, InputStatistics]], weight: float) -> None:
    """Fold each layer's step statistics into its ``input_sq`` buffer: new = (1 - weight) old +
    weight * step mean, after one all-reduce over ranks for every layer together. Collective."""
    layers = [(buffer, stats) for buffer, stats in layers if stats.square_sum is not None]
    if not layers:
        return
    sums = torch.cat(
        [stats.square_sum for _, stats in layers]
        + [torch.tensor([float(stats.tokens) for _, stats in layers], device=layers[0][1].square_sum.device)]
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    offset, tokens = 0, sums[-len(layers) :]
    for i, (buffer, stats) in enumerate(layers):
        step_mean = sums[offset : offset + buffer.numel()] / tokens[i]
        offset += buffer.numel()
        buffer.copy_(((1 - weight) * buffer.float() + weight * step_mean).to(buffer.dtype))
        stats.square_sum, stats.tokens = None, 0
