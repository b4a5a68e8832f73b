"""SparseGPT (Frantar & Alistarh, ICML 2023), one-shot: each layer pruned and its kept weights
updated by the OBS sweep over its calibration Hessian (oneshot/sparsegpt.py). The new weights
are written into the backbone, so its zeros are the mask and S = |W| selects exactly them."""

from __future__ import annotations

import deepspeed
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, OneShotConfig, PSTConfig
from ..layers.base import LayerSite, SparseLinear
from ..layers.pst import PSTLinear
from ..oneshot.calibrate import prune_one_shot
from ..oneshot.sparsegpt import sparsegpt_prune
from .base import Calibration, Method


class SparseGPT(Method):
    name = "sparsegpt"
    trains = False
    calibrates = True
    rewrites_backbone = True

    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        return pst.replaced(init=cls.name)

    @classmethod
    def check_as_warm_start(cls, pst: PSTConfig) -> None:
        if pst.init_schedule == "ramp" and pst.kind().grouped:
            raise ConfigError(
                f"pst.init=sparsegpt prunes pst.mask={pst.mask}'s whole pattern at once: "
                "use pst.init_schedule=hold, or pst.init=wanda to ramp into it"
            )
        if not pst.kind().obs_prunable:
            raise ConfigError(
                f"pst.init=sparsegpt supports pst.mask {', '.join(obs_prunable_kinds())}, not {pst.mask}"
            )

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return PSTLinear(base, self.pst, site)

    @classmethod
    def calibrate(cls, calibration: Calibration, oneshot: OneShotConfig) -> None:
        def prune(layer: SparseLinear, hessian: torch.Tensor) -> None:
            # distillation's teacher (layer.dense_teacher) has held a copy of W since it was built
            with torch.no_grad(), deepspeed.zero.GatheredParameters([layer.weight], modifier_rank=0):
                updated = sparsegpt_prune(
                    layer.oriented_weight(),
                    hessian,
                    layer.mask_kind,
                    layer.pruned_count,
                    oneshot.block_columns,
                    oneshot.damp,
                )
                if layer.revivable:  # kept values written, pruned ones left to come back
                    layer.hold_start(updated)
                else:
                    layer.oriented_weight().copy_(updated.to(layer.weight.dtype))

        prune_one_shot(calibration, oneshot.sequential, name=cls.name, prune_with_hessian=prune)


def obs_prunable_kinds() -> list[str]:
    from ..masks.kinds import MASK_KINDS

    return [name for name, kind in MASK_KINDS.items() if kind.obs_prunable]
