"""A model that is already sparse, kept as it is: the mask is where its weights are zero
(oneshot/zeros.py). As pst.init it starts training from those zeros (masked LoRA keeps them,
PST may move them at the same count); as a method it evaluates and exports the model."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, PSTConfig
from ..layers.base import LayerSite, SparseLinear
from ..layers.pst import PSTLinear
from ..oneshot.zeros import zero_counts
from .base import Method

# How far the model's own zeros may lie from pst.final_sparsity before the start is refused: a
# dense model with a few exact zeros (a quantized one's) would otherwise train at ~0% sparsity
# while the config says otherwise.
SPARSITY_TOLERANCE = 0.05


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

    @classmethod
    def counts_at_start(cls, layers: dict[str, SparseLinear], pst: PSTConfig) -> dict[str, torch.Tensor]:
        counts = zero_counts(layers)
        pruned = sum(int(count.sum()) for count in counts.values())  # per row, or one per matrix
        share = pruned / sum(layer.out_features * layer.in_features for layer in layers.values())
        if abs(share - pst.final_sparsity) > SPARSITY_TOLERANCE:
            raise ConfigError(
                f"pst.init=zeros keeps the model's own zeros, {100 * share:.2f}% of its targeted weights, "
                f"but pst.final_sparsity={pst.final_sparsity}: set pst.final_sparsity={share:.4f} to train "
                "it at its own sparsity, or prune it first (pst.init=wanda or sparsegpt)"
            )
        return counts

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return PSTLinear(base, self.pst, site)
