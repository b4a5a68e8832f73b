"""Random pruning, the floor every method must beat: a uniformly random mask at the scheduled
sparsity (the final one, held from the start), the backbone frozen and nothing trained.

The scores are uniform noise drawn again at each use from a generator seeded by the layer's
name, so every rank, every forward and export select the same mask and nothing weight-sized
is stored. The layer is PST's, whose factors stay at their init (U V = 0) and are never stepped.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PSTConfig
from ..layers.base import LayerSite
from ..layers.pst import PSTLinear
from .base import Method
from .magnitude import Magnitude


class RandomMaskLinear(PSTLinear):
    """A PST layer whose importance is seeded noise: its mask is a uniformly random kept set."""

    def __init__(
        self, base: nn.Linear | Conv1D, config: PSTConfig, site: LayerSite | None = None, *, seed: int
    ) -> None:
        super().__init__(base, config, site)
        self.seed = seed

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(self.out_features, self.in_features, generator=generator)
        weight = self.oriented_weight().detach().float()
        return scores.to(weight.device), weight

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.masked_forward(x)


class Random(Method):
    name = "random"
    trains = False

    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        # Its seeded noise is its start: a YAML's one-shot warm start (pst.init) does not apply.
        return pst.replaced(init=Magnitude.name)

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return RandomMaskLinear(base, self.pst, site, seed=zlib.crc32(site.name.encode()))
