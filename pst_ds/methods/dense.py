"""Full fine-tuning: no layer is replaced, every parameter of the model trains; nothing pruned."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from .base import Method


class Dense(Method):
    name = "dense"
    prunes = False
    frozen_backbone = False
    injects = False

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> None:
        return None
