"""Gradual magnitude pruning: S = |W| (times the input norms with pst.importance=activation),
the weight fine-tuned; with pst.mask=nm it is SR-STE-style N:M magnitude training."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from ..layers.baselines import MagnitudeLinear
from .base import Method


class Magnitude(Method):
    name = "magnitude"
    frozen_backbone = False
    warm_startable = True
    starts_training = True  # as pst.init: the release's start, the magnitude mask on the schedule

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return MagnitudeLinear(base, self.pst, site)
