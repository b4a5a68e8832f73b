"""PST (Li et al., IJCAI 2022): the weight frozen, six small factors trained (layers/pst.py)."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.pst import PSTLinear
from .base import Method


class PST(Method):
    name = "pst"
    warm_startable = True
    learns_thresholds = True
    # W', S, M * W', dS, dW' and G (fp32), alive at once in backward (layers/pst_function.py)
    transient_weight_copies = 6

    def build_layer(self, name: str, base: nn.Linear | Conv1D) -> nn.Module:
        return PSTLinear(base, self.pst)

    def factor_ranks(self) -> dict[str, int]:
        return {"pst.weight_rank": self.pst.weight_rank, "pst.mask_rank": self.pst.mask_rank}
