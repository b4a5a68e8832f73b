"""The cubic sparsity schedule of the PST release (Zhu & Gupta's, as fractions of total steps),
and the controller that puts it in force in the layers."""

from __future__ import annotations

from types import MappingProxyType

import deepspeed
import torch

from ..layers.base import SparseLinear
from ..layers.importance import fold_step
from ..layers.step import StepBoard, StepRecord
from ..masks.allocation import allocate_kept
from ..masks.select import num_pruned
from ..methods import Calibration, Method
from ..oneshot.owl import owl_profile


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


class SparsityController:
    """The one writer of every pruned layer's mask state, after each optimizer step.

    It writes each layer's ``pruned`` counts (the kind's count at the scheduled sparsity, or, for
    learned thresholds, the counts allocated from all logits so that the model as a whole prunes
    exactly the scheduled count), and tells activation importance when to gather input statistics
    (the dense warm-up, unless a warm start's calibration gathered them; always with a moving
    average). Every rank computes the same state from the same (gathered) values.
    """

    def __init__(self, method: Method, total_steps: int, layers: dict[str, SparseLinear]) -> None:
        self.method, self.config, self.total_steps, self.layers = method, method.pst, total_steps, layers
        self.learned = method.pst.kind().learned
        self.activation = method.pst.importance == "activation"
        # Each layer's final sparsity when they differ (pst.sparsity_profile, set from calibration);
        # None: uniform. At every step a layer's sparsity is the schedule's times its final/target.
        self.profile: dict[str, float] | None = None
        # Each layer's own mask state, whatever the schedule says (pst.init=zeros: its weight's
        # zeros, read again whenever a run is built: the weights are frozen). None: the schedule's.
        self.own_counts = method.own_counts(layers)
        # The layers' board (one per model): where each step's record is published.
        self.board = next(iter(layers.values())).board if layers else StepBoard()

    def sparsity_at(self, step: int) -> float:
        """The sparsity in force after ``step`` optimizer steps: 0 for methods that do not prune,
        the final sparsity throughout after a one-shot start (or without training), else the
        cubic schedule."""
        config = self.config
        if not self.method.prunes:
            return 0.0
        if self.own_counts is not None:
            return self._share(self.own_counts)
        if self.method.holds_final_sparsity():
            return config.final_sparsity
        return cubic_sparsity(
            step,
            self.total_steps,
            config.initial_sparsity,
            config.final_sparsity,
            config.initial_warmup,
            config.final_warmup,
        )

    def warm_start(self, calibration: Calibration) -> None:
        """The method's one-shot start (pst.init) from ``calibration``; with a sparsity profile,
        each layer's share is found first, from the outliers of the dense model. Collective."""
        config = self.config
        if config.sparsity_profile == "owl":
            self.profile = owl_profile(calibration, config.final_sparsity, config.owl_m, config.owl_lmbda)
        self.method.warm_start(calibration)

    def _in_warmup(self, step: int) -> bool:
        """Step ``step`` (0-based) gathers the warm-up's input norms: it still runs at the initial
        sparsity (the first one always counts), and no calibration gathered them (pst.init)."""
        if self.method.warm_start_method() is not None:
            return False
        return step == 0 or step <= self.config.initial_warmup * self.total_steps

    def put_in_force(self, layers: dict[str, SparseLinear], sparsity: float) -> None:
        """``sparsity`` in ``layers`` now, whatever the schedule says (the dense model evaluated
        before a warm start; a one-shot method's blocks as it prunes them), as each layer's share
        of it under the profile (with a layer's own count, that count whenever any is pruned)."""
        for name, layer in layers.items():
            if self.own_counts is not None and sparsity > 0:
                layer.put_in_force(self.own_counts[name])
            else:
                layer.sparsity = sparsity * self._scale(name)

    def put_start_strength(self, step: int) -> None:
        """A revivable start's bias, at its share after ``step`` steps: 1 down to 0 over
        pst.start_bias_decay of the run (PSTLinear.hold_start)."""
        decay_steps = self.config.start_bias_decay * self.total_steps
        strength = max(0.0, 1.0 - step / decay_steps) if decay_steps > 0 else 0.0
        for layer in self.layers.values():
            if layer.revivable:
                layer.put_start_strength(strength)

    def _share(self, counts: dict[str, torch.Tensor]) -> float:
        """The pruned share of all the layers with ``counts`` in force."""
        numel = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        return sum(int(count.sum()) for count in counts.values()) / numel

    def _scale(self, name: str) -> float:
        """Layer ``name``'s sparsity over the model's (1 without a profile)."""
        final = self.config.final_sparsity
        return self.profile[name] / final if self.profile is not None and final > 0 else 1.0

    def apply(self, step: int, logged: bool = False) -> None:
        """The state in force for the forwards of step ``step + 1`` (after ``step`` steps): the
        layers' counts, then the step's record (``logged``: its first forward notes the mask)."""
        sparsity = self.sparsity_at(step)
        shifts = {}
        if self.learned:
            shifts = self._allocate(sparsity)
        else:
            self.put_in_force(self.layers, sparsity)
        self.put_start_strength(step)
        gathering = self.activation and (self._in_warmup(step) or self.config.activation_ema > 0)
        self.board.publish(StepRecord(step, logged, gathering, MappingProxyType(shifts)))

    def end_step(self, step: int) -> None:
        """After step ``step + 1``'s optimizer step: fold its input statistics (collective)."""
        if not self.activation or not (self._in_warmup(step) or self.config.activation_ema > 0):
            return
        weight = 1.0 / (step + 1) if self._in_warmup(step) else self.config.activation_ema
        fold_step(((layer.input_sq, layer.input_stats) for layer in self.layers.values()), weight)

    def _allocate(self, sparsity: float) -> dict[str, float]:
        """Put in force the counts the logits keep at ``sparsity`` over the whole model; return
        each layer's shift of its logits."""
        layers = list(self.layers.values())
        logits = [layer.threshold_logit for layer in layers]
        with deepspeed.zero.GatheredParameters(logits):  # tiny; every rank needs all of them
            # One copy to the host for all of them: the step's one wait for the device here.
            flat = torch.cat([logit.detach().float().reshape(-1) for logit in logits]).cpu()
        sizes = torch.cat([self._group_sizes(layer) for layer in layers])
        total = int(sizes.sum())
        shift, kept = 0.0, sizes
        counts = [logit.ds_numel if hasattr(logit, "ds_numel") else logit.numel() for logit in logits]
        # A profile starts the logits apart: at the final sparsity each layer keeps its profile's share.
        prior = [self._prior(name) for name in self.layers]
        if sparsity > 0:
            flat = flat + torch.cat([torch.full((n,), p) for n, p in zip(counts, prior, strict=True)])
            shift, kept = allocate_kept(flat, sizes, total - num_pruned(total, sparsity))
        offset, shifts = 0, {}
        for layer, count, p in zip(layers, counts, prior, strict=True):
            layer.put_in_force(sizes[offset : offset + count] - kept[offset : offset + count])
            shifts[layer.layer_name] = shift + p
            offset += count
        return shifts

    def _prior(self, name: str) -> float:
        """logit(1 - s_layer) - logit(1 - s_final): 0 without a profile."""
        if self.profile is None:
            return 0.0
        keep, target = 1 - self.profile[name], 1 - self.config.final_sparsity
        return float(
            torch.logit(torch.tensor(keep, dtype=torch.float64), eps=1e-6)
            - torch.logit(torch.tensor(target, dtype=torch.float64), eps=1e-6)
        )

    @staticmethod
    def _group_sizes(layer: SparseLinear) -> torch.Tensor:
        rows, cols = layer.out_features, layer.in_features
        if layer.mask_kind.per_row:
            return torch.full((rows,), cols, dtype=torch.long)
        return torch.tensor([rows * cols], dtype=torch.long)

    def layer_sparsities(self) -> dict[str, float]:
        return {name: layer.sparsity for name, layer in self.layers.items()}

    def global_sparsity(self) -> float:
        """Pruned share over all pruned matrices, from the counts in force (on the host)."""
        pruned = sum(int(layer.pruned_count.sum()) for layer in self.layers.values())
        numel = sum(layer.out_features * layer.in_features for layer in self.layers.values())
        return pruned / numel if numel else 0.0
