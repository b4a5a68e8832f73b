"""Masked LoRA: the recipe people use to recover a pruned LLM (SPP, SQFT, LoSA, PERP's MaskLoRA).
A one-shot mask (pst.init) frozen from the first step, and a LoRA update (the lora section)
trained under it: y = x (M * (W + s B A))^T + b; export writes M * (W + s B A), so the zeros
survive. The baseline PST's learned mask must beat at equal tokens and equal time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, PSTConfig
from ..layers.base import LayerSite
from ..layers.masked_lora import MaskedLoRALinear
from .base import Method

if TYPE_CHECKING:
    from ..config import ExperimentConfig


class MaskedLoRA(Method):
    name = "masked_lora"
    warm_startable = True
    # The workspace's slots (layers/masked_lora.py): the merged weight and G (M * G over it)
    transient_weight_copies = 2

    def mask_bytes_held(self, numel: int) -> int:
        return -(-numel // 8)  # the frozen mask's bits (none where W's own zeros are the mask)

    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        # The mask must never move: S = |W|, times input norms only where the start's mask is
        # scored by them (a warm-up would gather them during the first step and move it).
        init = Method.registry.get(pst.init)  # None: not settled yet ("auto")
        importance = "activation" if init is not None and init.scores_by_input_norms else "magnitude"
        return pst.replaced(importance=importance, activation_ema=0.0)

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        super().check(config)
        if config.pst.init_schedule == "ramp":
            raise ConfigError(
                "method=masked_lora freezes the start's mask from the first step: pst.init_schedule=ramp "
                "would move it (use pst.init_schedule=hold, or method=pst)"
            )

    def holds_final_sparsity(self) -> bool:
        return True  # the start's mask, frozen from the first step (magnitude's too: no schedule)

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return MaskedLoRALinear(base, self.pst, self.config.lora, site)

    def factor_ranks(self) -> dict[str, int]:
        return {"lora.rank": self.config.lora.rank}
