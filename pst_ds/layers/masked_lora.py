"""MaskedLoRALinear: a LoRA update trained under a frozen one-shot mask, merged without losing its
zeros (the recipe of SPP, SQFT, LoSA and PERP's MaskLoRA).

For a frozen weight W (out x in), with only A (r x in) and B (out x r) trained:

    M  = the mask kind's kept set of S = |W| (times the input norms after Wanda's start), at the
         count the start put in force: W never changes, so neither does M
    y  = x @ (M * (W + s * B @ A)).T + b          s = lora.alpha / lora.rank

Export writes M * (W + s B A), so every pruned entry stays zero. M is kept as nothing: it is read
from W (its zeros after SparseGPT's start, or a model that is already sparse) and the mask state
(the count, the input norms), and its threshold is selected once for the whole run. Forward and
backward merge the update in fp32 and keep nothing weight-sized between them: backward merges
again and reads M again from W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoRAConfig, PSTConfig
from .base import LayerSite, SparseLinear
from .baselines import lora_factors


def _merged(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, keep: torch.Tensor
):
    """M * (W + s B A), (out, in), fp32."""
    return torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scale).mul_(keep)


class MaskedLoRAFunction(torch.autograd.Function):
    """y = x (M * (W + s B A))^T + b, saving x and the parameters only (nothing weight-sized)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, transposed, keep_fn):  # noqa: ANN001, ANN205
        oriented = weight.t() if transposed else weight
        with torch.no_grad():
            merged = _merged(oriented, lora_A, lora_B, scale, keep_fn())
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scale, ctx.transposed, ctx.keep_fn, ctx.has_bias = scale, transposed, keep_fn, bias is not None
        return F.linear(x, merged.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, weight, lora_A, lora_B = ctx.saved_tensors
        oriented = weight.t() if ctx.transposed else weight
        keep = ctx.keep_fn()
        grad_x = None
        if ctx.needs_input_grad[0]:
            merged = _merged(oriented, lora_A, lora_B, ctx.scale, keep)
            grad_x = grad_y @ merged.to(grad_y.dtype)
        flat_grad, flat_x = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        # dL/d(BA) = s * M * G, G = dy^T x: the weight-sized gradient LoRA alone never forms
        # (s is applied to the thin products: one pass over a weight-sized tensor fewer).
        masked = (flat_grad.t() @ flat_x).float().mul_(keep)
        grad_B = (masked @ lora_A.float().t()).mul_(ctx.scale).to(lora_B.dtype)
        grad_A = (lora_B.float().t() @ masked).mul_(ctx.scale).to(lora_A.dtype)
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


class MaskedLoRALinear(SparseLinear):
    """A frozen, pruned ``nn.Linear`` or GPT-2 ``Conv1D`` with a LoRA update merged under its mask."""

    def __init__(
        self, base: nn.Linear | Conv1D, config: PSTConfig, lora: LoRAConfig, site: LayerSite | None = None
    ) -> None:
        super().__init__(base, config, site)
        self.scale = lora.alpha / lora.rank
        self.lora_A, self.lora_B = lora_factors(self, lora)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"method": [self.lora_A, self.lora_B]}

    def selection_key(self) -> object:
        """An optimizer step changes A and B, never W nor the mask: the selection stays held
        until another count is put in force."""
        return None

    def put_in_force(self, pruned: torch.Tensor) -> None:
        # The controller writes the same count after every step; only a new one selects again.
        if self._held is None or not torch.equal(pruned.reshape(self.pruned.shape).cpu(), self._pruned_host):
            super().put_in_force(pruned)

    def frozen_scores(self) -> torch.Tensor:
        """S = |W| (times the input norms), fp32, (out, in): fixed for the whole run."""
        weight = self.oriented_weight().detach().float()
        scale = self.column_scale()
        return weight.abs() if scale is None else weight.abs() * scale

    def _keep(self, reuse: bool) -> Callable[[], torch.Tensor]:
        def keep() -> torch.Tensor:
            scores = self.frozen_scores()
            return self.selection(scores, check=self.track_mask, reuse=reuse).mask(scores)

        return keep

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        update = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return self.frozen_scores(), self.oriented_weight().detach().float() + update

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._keep(reuse=self.reuses_selection())
        if self.track_mask:
            with torch.no_grad():
                self.note_mask(keep())
        return MaskedLoRAFunction.apply(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.transposed, keep
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, "
            f"mask={self.mask_kind.describe()}, sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )
