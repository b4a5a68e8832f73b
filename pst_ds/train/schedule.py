"""The cubic sparsity schedule of the PST release (Zhu & Gupta's, as fractions of total steps),
and the controller that puts it in force in the layers."""

from __future__ import annotations

import deepspeed
import torch

from ..config import PRUNING_METHODS, PSTConfig
from ..layers.base import SparseLinear
from ..layers.importance import fold_step
from ..masks.allocation import allocate_kept
from ..masks.select import num_pruned


def cubic_sparsity(
    step: int,
    total_steps: int,
    initial: float,
    final: float,
    initial_warmup: float,
    final_warmup: float,
) -> float:
    """Sparsity in force after ``step`` optimizer steps out of ``total_steps``.

    Held at ``initial`` for the first ``initial_warmup`` fraction of steps, at ``final``
    for the last ``final_warmup`` fraction, and cubic in between:
    s = final + (initial - final) * (1 - (t - iw*T) / (T - (iw + fw)*T))^3.
    """
    warm_start = initial_warmup * total_steps
    ramp_end = total_steps - final_warmup * total_steps
    if step <= warm_start:
        return initial
    if step > ramp_end:
        return final
    progress = (step - warm_start) / (ramp_end - warm_start)
    return final + (initial - final) * (1.0 - progress) ** 3


def scheduled_sparsity(method: str, config: PSTConfig, step: int, total_steps: int) -> float:
    """The sparsity in force after ``step`` optimizer steps: 0 for methods that do not prune, the
    final sparsity throughout after a one-shot warm start (pst.init), else the cubic schedule."""
    if method not in PRUNING_METHODS:
        return 0.0
    if config.init != "magnitude":
        return config.final_sparsity
    return cubic_sparsity(
        step,
        total_steps,
        config.initial_sparsity,
        config.final_sparsity,
        config.initial_warmup,
        config.final_warmup,
    )


class SparsityController:
    """Puts the schedule in force in every pruned layer, after each optimizer step.

    It writes each layer's mask state (the ``pruned`` counts: the kind's count at the
    scheduled sparsity, or, for learned thresholds, the counts allocated from all logits so
    that the model as a whole prunes exactly the scheduled count), and tells activation
    importance when to gather input statistics (the dense warm-up, unless a warm start's
    calibration gathered them; always with a moving average).
    Every rank computes the same state from the same (gathered) values.
    """

    def __init__(
        self, method: str, config: PSTConfig, total_steps: int, layers: dict[str, SparseLinear]
    ) -> None:
        self.method, self.config, self.total_steps, self.layers = method, config, total_steps, layers
        self.learned = config.mask == "threshold" and method == "pst"
        self.activation = config.importance == "activation"

    def sparsity_at(self, step: int) -> float:
        return scheduled_sparsity(self.method, self.config, step, self.total_steps)

    def _in_warmup(self, step: int) -> bool:
        """Step ``step`` (0-based) gathers the warm-up's input norms: it still runs at the initial
        sparsity (the first one always counts), and no calibration gathered them (pst.init)."""
        if self.config.init != "magnitude":
            return False
        return step == 0 or step <= self.config.initial_warmup * self.total_steps

    def apply(self, step: int) -> None:
        """The state in force for the forward of step ``step + 1`` (after ``step`` steps)."""
        sparsity = self.sparsity_at(step)
        if self.learned:
            self._allocate(sparsity)
        else:
            for layer in self.layers.values():
                layer.sparsity = sparsity
        collecting = self.activation and (self._in_warmup(step) or self.config.activation_ema > 0)
        for layer in self.layers.values():
            if layer.input_stats is not None:
                layer.input_stats.collecting = collecting

    def end_step(self, step: int) -> None:
        """After step ``step + 1``'s optimizer step: fold its input statistics (collective)."""
        if not self.activation or not (self._in_warmup(step) or self.config.activation_ema > 0):
            return
        weight = 1.0 / (step + 1) if self._in_warmup(step) else self.config.activation_ema
        fold_step(((layer.input_sq, layer.input_stats) for layer in self.layers.values()), weight)

    def _allocate(self, sparsity: float) -> None:
        layers = list(self.layers.values())
        logits = [layer.threshold_logit for layer in layers]
        with deepspeed.zero.GatheredParameters(logits):  # tiny; every rank needs all of them
            flat = torch.cat([logit.detach().float().reshape(-1).cpu() for logit in logits])
        sizes = torch.cat([self._group_sizes(layer) for layer in layers])
        total = int(sizes.sum())
        shift, kept = 0.0, sizes
        if sparsity > 0:
            shift, kept = allocate_kept(flat, sizes, total - num_pruned(total, sparsity))
        offset = 0
        for layer, logit in zip(layers, logits, strict=True):
            count = logit.ds_numel if hasattr(logit, "ds_numel") else logit.numel()
            pruned = sizes[offset : offset + count] - kept[offset : offset + count]
            layer.pruned.copy_(pruned.reshape(layer.pruned.shape))
            layer.threshold_shift = shift
            offset += count

    @staticmethod
    def _group_sizes(layer: SparseLinear) -> torch.Tensor:
        rows, cols = layer.out_features, layer.in_features
        if layer.mask_kind.per_row:
            return torch.full((rows,), cols, dtype=torch.long)
        return torch.tensor([rows * cols], dtype=torch.long)

    def layer_sparsities(self) -> dict[str, float]:
        return {name: layer.sparsity for name, layer in self.layers.items()}

    def global_sparsity(self) -> float:
        """Pruned share over all pruned matrices, from the counts in force."""
        pruned = sum(int(layer.pruned.sum()) for layer in self.layers.values())
        numel = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        return pruned / numel if numel else 0.0
