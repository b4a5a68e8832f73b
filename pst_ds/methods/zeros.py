"""A model that is already sparse, kept as it is: the mask is where its weights are zero
(oneshot/zeros.py). As pst.init it starts training from those zeros (masked LoRA keeps them,
PST may move them at the same count); as a method it evaluates and exports the model."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, PSTConfig
from ..layers.base import LayerSite
from ..layers.pst import PSTLinear
from .base import Method


class Zeros(Method):
    name = "zeros"
    trains = False
    reads_zeros = True

    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        return pst.replaced(init=cls.name)

    @classmethod
    def check_as_warm_start(cls, pst: PSTConfig) -> None:
        if pst.kind().learned:
            raise ConfigError(
                f"pst.init=zeros holds each layer's own zeros; pst.mask={pst.mask} would allocate the "
                "counts anew: use pst.mask=topk"
            )
        if pst.init_schedule == "ramp":
            raise ConfigError("pst.init=zeros starts at the model's own sparsity: use pst.init_schedule=hold")

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return PSTLinear(base, self.pst, site)
