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

    def mask_bytes_held(self, numel: int) -> int:
        return -(-numel // 8) if self.revives_start() else 0  # the start's kept set, for its prior

    def revives_start(self) -> bool:
        """Whether a start that rewrites W is held as a decaying prior on S (pst.start_bias_decay),
        W keeping its original values where the start prunes, so they can come back."""
        init = self.warm_start_method()
        return init is not None and init.rewrites_backbone and self.pst.start_bias_decay > 0

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        update = weight_update(self.pst, self.config.lora)
        return PSTLinear(base, self.pst, site, update, revivable=self.revives_start())

    def factor_ranks(self) -> dict[str, int]:
        update = "lora.rank" if self.pst.update == "lora" else "pst.weight_rank"
        return {update: weight_update(self.pst, self.config.lora).rank, "pst.mask_rank": self.pst.mask_rank}
