"""PST (Li et al., IJCAI 2022): the weight frozen, six small factors trained (layers/pst.py); the
weight update in the form pst.update names (LoRA's by default, with the lora section's rank)."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.base import LayerSite
from ..layers.pst import PSTLinear
from ..layers.update import weight_update
from .base import Method


class PST(Method):
    name = "pst"
    warm_startable = True
    learns_thresholds = True
    # The workspace's slots (layers/pst_function.py): W', S, M * W', G, dS and dW', fp32 at most
    transient_weight_copies = 6

    def mask_bytes_kept(self, numel: int) -> int:
        return -(-numel // 8) if self.pst.saves_mask_bits() else 0

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return PSTLinear(base, self.pst, site, weight_update(self.pst, self.config.lora))

    def factor_ranks(self) -> dict[str, int]:
        update = "lora.rank" if self.pst.update == "lora" else "pst.weight_rank"
        return {update: weight_update(self.pst, self.config.lora).rank, "pst.mask_rank": self.pst.mask_rank}
