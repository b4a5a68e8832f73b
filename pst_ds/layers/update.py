"""The weight update W' = W + scale * U V that PST and masked LoRA train (pst.update).

    lora    LoRA's (Hu et al. 2021, the default): U (out x r) = 0, V (r x in) Kaiming-uniform, as
            PEFT's B and A; scale = lora.alpha / lora.rank, absolute. The random factor on the
            input side trains better and takes larger learning rates (arXiv 2406.08447).
    scaled  the PST release's: U ~ N(0, pst.update_init_std^2), V = 0, rank pst.weight_rank;
            scale = pst.beta times the layer's unit u (pst.factor_scale).

Both are the same product to every other part of the layer: only the start and the scale differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoRAConfig, PSTConfig


@dataclass(frozen=True)
class WeightUpdate:
    """The update's rank, its scale, whether the scale is in the layer's unit, and its start."""

    rank: int
    scale: float
    in_weight_units: bool
    random_output_side: bool  # U random and V = 0 (the release's), else U = 0 and V random (LoRA's)
    init_std: float = 1.0  # of the random U (the release's form)

    def factors(
        self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """(U (out, rank), V (rank, in)) at their start: their product is 0 either way."""
        factory = {"dtype": dtype, "device": device}
        U = torch.zeros(out_features, self.rank, **factory)
        V = torch.zeros(self.rank, in_features, **factory)
        if self.random_output_side:
            U.normal_(0.0, self.init_std)
        else:
            nn.init.kaiming_uniform_(V, a=math.sqrt(5))  # PEFT's init of LoRA's A
        return nn.Parameter(U), nn.Parameter(V)


def lora_update(lora: LoRAConfig) -> WeightUpdate:
    return WeightUpdate(lora.rank, lora.alpha / lora.rank, in_weight_units=False, random_output_side=False)


def weight_update(pst: PSTConfig, lora: LoRAConfig | None = None) -> WeightUpdate:
    """The form ``pst.update`` names, LoRA's with the ``lora`` section's rank and alpha."""
    if pst.update == "lora":
        return lora_update(lora or LoRAConfig())
    return WeightUpdate(pst.weight_rank, pst.beta, True, True, pst.update_init_std)
