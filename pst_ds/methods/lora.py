"""LoRA (Hu et al. 2021): a dense low-rank update beside the frozen weight; nothing pruned."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from ..layers.baselines import LoRALinear
from .base import Method


class LoRA(Method):
    name = "lora"
    prunes = False

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return LoRALinear(base, self.config.lora, site)

    def factor_ranks(self) -> dict[str, int]:
        return {"lora.rank": self.config.lora.rank}
