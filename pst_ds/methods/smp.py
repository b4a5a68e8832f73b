"""Static model pruning: movement's trained scores with the weight frozen."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from ..layers.baselines import MovementLinear
from .base import Method


class SMP(Method):
    name = "smp"
    learns_scores = True

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return MovementLinear(base, self.pst, train_weight=False, site=site)
