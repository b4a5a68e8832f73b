"""PSTLinear: a frozen linear layer pruned by PST (Li et al., IJCAI 2022), trained through tiny factors.

For a frozen weight W (out x in), with only U, V, A, B, R, C trained:

    W' = W + s * U @ V                                                  (low-rank weight update)
    S  = |W'| + u * (alpha1 * A @ B + alpha2 * (R[:, None] + C[None, :]))  (importance)
    M  = the mask kind's kept set of S (masks/kinds.py), straight-through gradient to S
    y  = x @ (M * W').T + b

The update's form, rank and scale s are pst.update's (layers/update.py): LoRA's by default
(U = 0, V random, s = lora.alpha / lora.rank), or the release's (U ~ N(0, std^2), V = 0,
s = beta * u). u, the unit of the learned terms, is 1 or the original weight's mean |W|
(pst.factor_scale); it is folded into the hyper-parameters the Function sees. A ~ N(0, 1) and
B, R, C = 0, so training starts as magnitude pruning (S = |W|), or from a one-shot method's mask
with pst.init (oneshot/calibrate.py).
With ``pst.importance=activation`` |W'| is scaled per input column (layers/importance.py); with
``pst.mask=threshold`` a trained logit per matrix (or row) sets its share (masks/allocation.py).
S and the masked weight are computed in fp32 whatever the model's dtype, so ties from a
low-precision W cannot make the sparsity inexact. The forward and backward themselves live
in pst_function.py, which keeps nothing weight-sized between them.

Masked LoRA (layers/masked_lora.py) is this layer with the importance frozen: no A, B, R, C, and
M selected once from S = |W| and held. The update, the merge and its gradient are the same code.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import ClassVar

import deepspeed
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PSTConfig
from ..masks.bits import pack_rows
from .base import LayerSite, SparseLinear
from .pst_blocks import extended_importance_factors, kernels
from .pst_function import PSTHyper, PSTLinearFunction, StartPrior
from .update import WeightUpdate, weight_update


class PSTLinear(SparseLinear):
    """PST on an ``nn.Linear`` or a GPT-2 ``Conv1D``: the weight frozen, six small factors trained.

    The factors are shaped for the (out, in) orientation whatever the base layout.
    """

    learns_mask: ClassVar[bool] = True  # masked LoRA's: False (the importance frozen)

    def __init__(
        self,
        base: nn.Linear | Conv1D,
        config: PSTConfig,
        site: LayerSite | None = None,
        update: WeightUpdate | None = None,
        revivable: bool = False,
    ) -> None:
        """``update``: the weight update's form (default: ``pst.update``'s, LoRA's with the lora
        section's default rank and alpha). ``revivable``: a start that rewrites W will hold its
        kept set as a decaying prior on S (``hold_start``), not as zeros in W."""
        super().__init__(base, config, site)
        out_features, in_features = self.out_features, self.in_features
        self.update = update or weight_update(config)
        self.hyper_per_unit = PSTHyper(
            config.alpha1,
            config.alpha2,
            self.update.scale,
            self.transposed,
            config.compile,
            config.threshold_band,
            config.saves_mask_bits(),
            config.low_precision_forward == "split",
        )
        # Saved with the model: fixed by the original weight, whatever a warm start writes later.
        # (Persistent even when it is 1: export builds on meta and fills every buffer from the
        # checkpoint; one that is not saved would be left uninitialised.)
        uses_unit = self.learns_mask or self.update.in_weight_units
        self.register_buffer(
            "factor_unit", factor_unit(base, config if uses_unit else config.replaced(factor_scale="one"))
        )
        self._apply_unit()
        self.register_load_state_dict_post_hook(lambda module, _: module._apply_unit())
        self.weight_rank, self.mask_rank = self.update.rank, config.mask_rank
        self.U, self.V = self.update.factors(out_features, in_features, base.weight.dtype, base.weight.device)
        if not self.learns_mask:
            return
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.A = nn.Parameter(torch.randn(out_features, config.mask_rank, **factory))
        self.B = nn.Parameter(torch.zeros(config.mask_rank, in_features, **factory))
        self.R = nn.Parameter(torch.zeros(out_features, **factory))
        self.C = nn.Parameter(torch.zeros(in_features, **factory))
        if self.mask_kind.learned:  # the threshold's logit: 0, a uniform share, to start
            self.threshold_logit = nn.Parameter(
                torch.zeros(out_features if self.mask_kind.per_row else 1, **factory)
            )
        self.revivable = revivable
        if revivable:  # the start's kept set (bits, or bool where in is not a multiple of 8) and its bias
            device = base.weight.device
            packed = in_features % 8 == 0
            shape, dtype = (
                ((out_features, in_features // 8), torch.uint8)
                if packed
                else ((out_features, in_features), torch.bool)
            )
            self.register_buffer("start_keep", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer("start_bias", torch.zeros((), device=device))  # in force
            self.register_buffer("start_bias_full", torch.zeros((), device=device))  # at step 0
            self._start_strength, self._start_bias_full_host = 1.0, 0.0
            self.register_load_state_dict_post_hook(lambda module, _: module._refresh_start())

    def _apply_unit(self) -> None:
        """The hyper-parameters in the layer's unit, on the host (set on build and load, never read
        from the device per forward). The unit is rounded to bf16: the same number whether the
        buffer was saved in fp32 or after an engine cast the model to bf16, so a resumed run
        computes what the uninterrupted one did."""
        unit = 1.0 if self.factor_unit.is_meta else float(self.factor_unit.to(torch.bfloat16))
        h = self.hyper_per_unit
        beta = unit * h.beta if self.update.in_weight_units else h.beta
        self.hyper = replace(h, alpha1=unit * h.alpha1, alpha2=unit * h.alpha2, beta=beta)

    @property
    def start(self) -> StartPrior | None:
        """The revivable start's prior on S (None: none), from the buffers as they are now (an
        engine may have moved or cast them)."""
        return StartPrior(self.start_keep, self.start_bias) if self.revivable else None

    @torch.no_grad()
    def hold_start(self, start_weight: torch.Tensor) -> None:
        """A start that rewrites W (SparseGPT's) gave ``start_weight`` (out, in), zero where it
        prunes: W takes its values where it keeps and keeps the original ones where it prunes, and
        S gets a bias on its kept set above every score, so the mask starts as the start's exactly
        and a pruned weight whose score grows once the bias decays comes back with its own value.
        Needs the whole weight (gathered under ZeRO-3); the input norms already in force."""
        keep = start_weight != 0
        weight = self.oriented_weight()
        weight.copy_(torch.where(keep, start_weight.to(weight.dtype), weight))
        self.start_keep.copy_(pack_rows(keep) if self.start_keep.dtype == torch.uint8 else keep)
        # Above the largest score by a margin. Before the first step U V = 0 and B, R, C = 0, so
        # S = a |W| (the factors, partitioned under ZeRO-3, need not be gathered for it).
        scale = self.column_scale()
        scores = weight.float().abs() if scale is None else weight.float().abs() * scale
        full = float(scores.max()) * 1.01 + 1e-6
        self.start_bias_full.fill_(full)
        self.start_bias.fill_(full * self._start_strength)
        self._start_bias_full_host = full

    def put_start_strength(self, strength: float) -> None:
        """The share of the start's bias in force (the controller's, from the schedule): written to
        the device only when it changed, without waiting for it."""
        if self.start is None or strength == self._start_strength:
            return
        self._start_strength = strength
        self.start_bias.fill_(self._start_bias_full_host * strength)

    def _refresh_start(self) -> None:
        self._start_bias_full_host = 0.0 if self.start_bias_full.is_meta else float(self.start_bias_full)
        in_force = 0.0 if self.start_bias.is_meta else float(self.start_bias)
        self._start_strength = in_force / self._start_bias_full_host if self._start_bias_full_host else 1.0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        if not self.learns_mask:
            return {"method": [self.U, self.V]}
        groups = {"method": [self.U, self.V], "importance": [self.A, self.B, self.R, self.C]}
        if self.mask_kind.learned:
            groups["thresholds"] = [self.threshold_logit]
        return groups

    def updated_and_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', S), (out, in), fp32, without autograd (needs the whole weight gathered).

        Through the forward's own kernel, so the mask reported and exported is bit for bit
        the one training used (the compiled and eager roundings of W' may differ).
        """
        hyper = self.hyper
        with torch.no_grad():
            Ae, Be = extended_importance_factors(self.A, self.B, self.R, self.C, hyper.alpha1, hyper.alpha2)
            run = kernels(hyper.compiled)["updated_and_scores"]
            shape = (self.out_features, self.in_features)
            out = (
                torch.empty(shape, device=self.weight.device),
                torch.empty(shape, device=self.weight.device),
            )
            return run(
                self.weight,
                self.U,
                self.V,
                Ae,
                Be,
                hyper.beta,
                hyper.transposed,
                self.column_scale(),
                out=out,
                **({} if self.start is None else self.start.kwargs()),
            )

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        updated, scores = self.updated_and_scores()
        return scores, updated

    @property
    def threshold_shift(self) -> float:
        """The shift of this layer's threshold logit in the step's record (the model-wide c
        plus its profile's prior; 0 before a controller publishes one)."""
        record = self.board.record
        return 0.0 if record is None else record.threshold_shifts.get(self.layer_name, 0.0)

    def keep_fraction(self) -> torch.Tensor | None:
        """rho = sigmoid(logit + c) of a learned threshold, for its gradient (masks/allocation.py)."""
        if not self.mask_kind.learned:
            return None
        return torch.sigmoid(self.threshold_logit + self.threshold_shift)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe_inputs(x)
        record = [] if self.track_mask else None
        y = PSTLinearFunction.apply(
            x,
            self.weight,
            self.bias,
            self.U,
            self.V,
            self.A,
            self.B,
            self.R,
            self.C,
            self.keep_fraction(),
            self.column_scale(),
            self.start,
            self.hyper,
            partial(self.selection, reuse=self.reuses_selection()),
            record,
        )
        if record:
            self.note_mask(record[0])
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_rank={self.weight_rank}, mask_rank={self.mask_rank}, "
            f"mask={self.mask_kind.describe()}, sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )


def factor_unit(base: nn.Linear | Conv1D, config: PSTConfig) -> torch.Tensor:
    """The unit of the layer's learned terms (pst.factor_scale), fp32 0-dim: mean |W| (the whole
    weight, gathered under ZeRO-3), or 1."""
    device = base.weight.device
    if config.factor_scale == "one" or device.type == "meta":
        return torch.ones((), dtype=torch.float32, device=device)
    with deepspeed.zero.GatheredParameters([base.weight]), torch.no_grad():
        return base.weight.detach().float().abs().mean()
