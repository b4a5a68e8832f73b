"""The baselines PST is compared with, as layers for the same injection, engine and schedule.

    magnitude  S = |W| (times the input norms with pst.importance=activation); y = x (M * W)^T + b;
               W trained (gradient G * M: pruned weights rest); with pst.mask=nm this is
               SR-STE-style N:M magnitude training
    movement   S = a score per weight (Sanh et al. 2020), initialised to |W| (the paper's constant
               0 would make the first masks a tie-break by position); M = the kind's mask of S
               with a straight-through gradient dS = G * W; W trained (dW = G * M)
    smp        as movement with W frozen: only the scores train (static model pruning)
    lora       y = x W^T + b + (alpha / r) x A^T B^T; A ~ Kaiming, B = 0; no pruning
    dense      no layer: every parameter of the model trains

The masks come from the same mask kinds as PST's (masks/kinds.py), so sparsities and patterns match.
These layers use plain autograd: they train weight-sized tensors anyway.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoRAConfig, PSTConfig
from ..masks.kinds import StraightThroughMask
from .base import LayerSite, SparseLinear, WrappedLinear
from .update import lora_update


class MagnitudeLinear(SparseLinear):
    """Gradual magnitude pruning: the mask keeps the largest |W|, the weight fine-tunes."""

    def __init__(self, base: nn.Linear | Conv1D, config: PSTConfig, site: LayerSite | None = None) -> None:
        super().__init__(base, config, site)
        self.weight.requires_grad_(True)

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.oriented_weight().detach().float()
        scale = self.column_scale()
        return (weight.abs() if scale is None else weight.abs() * scale), weight

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe_inputs(x)
        return self.masked_forward(x)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"method": [self.weight]}


class MovementLinear(SparseLinear):
    """Movement pruning (``train_weight``) or static model pruning (weights frozen)."""

    def __init__(
        self, base: nn.Linear | Conv1D, config: PSTConfig, train_weight: bool, site: LayerSite | None = None
    ) -> None:
        super().__init__(base, config, site)
        self.weight.requires_grad_(train_weight)
        with deepspeed.zero.GatheredParameters([self.weight]):  # partitioned under ZeRO-3
            magnitude = self.oriented_weight().detach().float().abs().clone()
        self.scores = nn.Parameter(magnitude)

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores.detach().float(), self.oriented_weight().detach().float()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"method": [self.weight], "scores": [self.scores]}

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        track = self.track_mask
        mask = StraightThroughMask.apply(self.scores, self.mask_kind, self.pruned_count, track)
        if track:
            self.note_mask(mask.detach() > 0)
        weight = self.oriented_weight()
        return F.linear(x, (mask * weight.float()).to(x.dtype), self.bias)


def lora_factors(layer: WrappedLinear, config: LoRAConfig) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's A (rank, in), Kaiming-uniform, and B (out, rank), zeros, in the base weight's dtype:
    the V and U of the update's LoRA form (layers/update.py)."""
    B, A = lora_update(config).factors(
        layer.out_features, layer.in_features, layer.weight.dtype, layer.weight.device
    )
    return A, B


class LoRALinear(WrappedLinear):
    """A dense low-rank update beside the frozen weight (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear | Conv1D, config: LoRAConfig, site: LayerSite | None = None) -> None:
        super().__init__(base, site)
        self.scale = config.alpha / config.rank
        self.lora_A, self.lora_B = lora_factors(self, config)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"method": [self.lora_A, self.lora_B]}

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.oriented_weight(), self.bias) + self.scale * low_rank

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in the base layer's own layout and dtype (for export)."""
        update = self.scale * (self.lora_B.float() @ self.lora_A.float())
        return self.to_base_layout(self.oriented_weight().float() + update)
