"""PSTLinear: a frozen linear layer pruned by PST (Li et al., IJCAI 2022), trained through tiny factors.

For a frozen weight W (out x in), with only U, V, A, B, R, C trained:

    W' = W + beta * U @ V                                         (low-rank weight update)
    S  = |W'| + alpha1 * A @ B + alpha2 * (R[:, None] + C[None, :])  (importance)
    M  = top-k(S) at the sparsity in force, straight-through gradient to S
    y  = x @ (M * W').T + b

Init U, A ~ N(0, 1) and V, B, R, C = 0, so training starts as magnitude pruning (S = |W|).
S and the masked weight are computed in fp32 whatever the model's dtype, so ties from a
low-precision W cannot make the sparsity inexact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PSTConfig
from .masks import StraightThroughTopK, topk_mask


class PSTLinear(nn.Module):
    """Wraps an ``nn.Linear`` or a GPT-2 ``Conv1D``, keeping its weight and bias Parameter objects.

    The factors are shaped for the (out, in) orientation whatever the base layout; the base
    weight keeps its own name and layout, so checkpoints and ZeRO-3 hooks still see it.
    """

    def __init__(self, base: nn.Linear | Conv1D, config: PSTConfig) -> None:
        super().__init__()
        # Conv1D stores its weight as (in, out) and computes x @ W.
        self.transposed = isinstance(base, Conv1D)
        self.weight = base.weight
        self.bias = base.bias
        # Under ZeRO-3 the weight may already be partitioned: its real shape is ds_shape.
        shape = tuple(getattr(base.weight, "ds_shape", base.weight.shape))
        out_features, in_features = (shape[1], shape[0]) if self.transposed else shape
        self.out_features, self.in_features = out_features, in_features
        self.alpha1, self.alpha2, self.beta = config.alpha1, config.alpha2, config.beta
        self.weight_rank, self.mask_rank = config.weight_rank, config.mask_rank
        self.sparsity = config.initial_sparsity
        # Mask settling, for logging: the trainer sets track_mask before a logged step's forward.
        self.track_mask = False
        self.mask_changes: int | None = None  # entries changed since the previous noted mask
        self._noted_mask: torch.Tensor | None = None

        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.U = nn.Parameter(torch.randn(out_features, config.weight_rank, **factory))
        self.V = nn.Parameter(torch.zeros(config.weight_rank, in_features, **factory))
        self.A = nn.Parameter(torch.randn(out_features, config.mask_rank, **factory))
        self.B = nn.Parameter(torch.zeros(config.mask_rank, in_features, **factory))
        self.R = nn.Parameter(torch.zeros(out_features, **factory))
        self.C = nn.Parameter(torch.zeros(in_features, **factory))

    def updated_weight(self) -> torch.Tensor:
        """W' = W + beta U V, (out, in), fp32."""
        w = self.weight.float()
        w = w.t() if self.transposed else w
        return w + self.beta * (self.U.float() @ self.V.float())

    def importance(self, updated: torch.Tensor) -> torch.Tensor:
        """S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T), fp32."""
        low_rank = self.A.float() @ self.B.float()
        rows_cols = self.R.float()[:, None] + self.C.float()[None, :]
        return updated.abs() + self.alpha1 * low_rank + self.alpha2 * rows_cols

    def masked_weight(self) -> torch.Tensor:
        """M * W', (out, in), fp32, differentiable (straight-through to S)."""
        updated = self.updated_weight()
        mask = StraightThroughTopK.apply(self.importance(updated), self.sparsity)
        if self.track_mask:
            self._note_mask(mask.detach() > 0)
        return mask * updated

    def _note_mask(self, mask: torch.Tensor) -> None:
        previous, self._noted_mask, self.track_mask = self._noted_mask, mask.cpu(), False
        self.mask_changes = None if previous is None else int((self._noted_mask != previous).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool (out, in) mask at the sparsity in force (needs the whole weight gathered)."""
        return topk_mask(self.importance(self.updated_weight()), self.sparsity)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """M * (W + beta U V) in the base layer's own layout and dtype (for export)."""
        merged = self.masked_weight()
        merged = merged.t() if self.transposed else merged
        return merged.to(self.weight.dtype).contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_rank={self.weight_rank}, mask_rank={self.mask_rank}, "
            f"sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )
