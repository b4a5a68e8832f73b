"""Wanda (Sun et al. 2024), one-shot: keep the largest |W_ij| * ||x_j|| per output row (or per
N:M group), from calibration data. The PST layer carries the mask (its importance is this
score with pst.importance=activation); its factors stay at their init, where U V = 0."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, OneShotConfig, PSTConfig
from ..layers.base import LayerSite
from ..layers.pst import PSTLinear
from ..oneshot.calibrate import prune_one_shot
from .base import Calibration, Method


class Wanda(Method):
    name = "wanda"
    trains = False
    calibrates = True
    scores_by_input_norms = True

    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        # Its own start, its score, and the paper's comparison group (rows) for top-k masks.
        scope = "row" if pst.kind().scoped else pst.mask_scope
        return pst.replaced(init=cls.name, importance="activation", mask_scope=scope)

    @classmethod
    def check_as_warm_start(cls, pst: PSTConfig) -> None:
        if pst.importance != "activation":
            raise ConfigError(
                "pst.init=wanda keeps Wanda's mask in force through |W'| * ||x||: "
                "set pst.importance=activation"
            )

    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module:
        return PSTLinear(base, self.pst, site)

    @classmethod
    def calibrate(cls, calibration: Calibration, oneshot: OneShotConfig) -> None:
        # The input norms are all it needs: S = ||x|| |W| then selects Wanda's mask.
        prune_one_shot(calibration, oneshot.sequential, name=cls.name)
