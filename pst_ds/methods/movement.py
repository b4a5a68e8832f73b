"""Movement pruning (Sanh et al. 2020): a trained score per weight, top-k with a straight-through
gradient; the weight fine-tuned."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from ..layers.baselines import MovementLinear
from .base import Method


class Movement(Method):
    name = "movement"
    frozen_backbone = False
    learns_scores = True

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return MovementLinear(base, self.pst, train_weight=True, site=site)
