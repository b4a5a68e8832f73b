"""MaskedLoRALinear: a LoRA update trained under a frozen one-shot mask, merged without losing its
zeros (the recipe of SPP, SQFT, LoSA and PERP's MaskLoRA).

For a frozen weight W (out x in), with only A (r x in) and B (out x r) trained:

    M  = the mask kind's kept set of S = |W| (times the input norms after Wanda's start), at the
         count the start put in force: W never changes, so neither does M
    y  = x @ (M * (W + s * B @ A)).T + b          s = lora.alpha / lora.rank

    G  = dy^T x           dB = s (M * G) A^T      dA = s B^T (M * G)      dx = dy (M * (W + s B A))

Export writes M * (W + s B A), so every pruned entry stays zero.

M is selected once, at the first training forward, and kept in the cheapest form: nothing where
it is exactly W's own nonzeros (after SparseGPT's start, or a model already sparse), else packed
to bits (out*in/8 bytes, held for the run). Forward and backward read it in one fused pass each
with the merge (torch.compile, as PST's layer): no S, no selection, no host sync in a step, and
nothing weight-sized kept between forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoRAConfig, PSTConfig
from ..masks.bits import pack_rows, unpacked_groups
from .base import LayerSite, SparseLinear
from .baselines import lora_factors
from .pst_function import low_rank_product
from .workspace import WORKSPACE


def frozen_keep(weight: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
    """M, bool (out, in), from its held form: W's nonzeros (None), bits (uint8, out x in/8), or
    itself (bool, where in is not a multiple of 8)."""
    if held is None:
        return weight != 0
    if held.dtype == torch.bool:
        return held
    return unpacked_groups(held).reshape(weight.shape)


def merged_under_mask(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    transposed: bool,
    held: torch.Tensor | None,
    grad: torch.Tensor | None = None,
    unrolled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M * (W + s B A), M * G if ``grad`` is given), (out, in), fp32: one pass over W."""
    w = (weight.t() if transposed else weight).float()
    keep = frozen_keep(w, held)
    merged = (w + scale * low_rank_product(lora_B, lora_A, unrolled)) * keep
    return merged, None if grad is None else grad.float() * keep


def merged_into(*args, out: tuple[torch.Tensor, torch.Tensor | None], **kwargs) -> tuple:
    """``merged_under_mask`` written into ``out`` (M * G over G's own buffer is fine: element-wise)."""
    values = merged_under_mask(*args, **kwargs, unrolled=True)
    return tuple(None if v is None else o.copy_(v) for o, v in zip(out, values, strict=True))


@cache
def merge_kernel(compiled: bool) -> Callable:
    """The fused pass through ``torch.compile``, writing into the buffers given; or eager, returning
    fresh tensors (each eager op writes one anyway)."""
    if not compiled:
        return lambda *args, out, **kwargs: merged_under_mask(*args, **kwargs)
    return torch.compile(merged_into, dynamic=True)


def _slot(name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return WORKSPACE.take(name, shape, dtype, device)


class MaskedLoRAFunction(torch.autograd.Function):
    """y = x (M * (W + s B A))^T + b, with M in its held form; saves x, the parameters and that form
    (nothing weight-sized)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, transposed, held, compiled):  # noqa: ANN001, ANN205
        shape = (lora_B.shape[0], lora_A.shape[1])
        out = (_slot("masked", shape, x.dtype, x.device), None)
        merged, _ = merge_kernel(compiled)(weight, lora_A, lora_B, scale, transposed, held, out=out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, held)
        ctx.scale, ctx.transposed, ctx.compiled, ctx.has_bias = scale, transposed, compiled, bias is not None
        return F.linear(x, merged.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, weight, lora_A, lora_B, held = ctx.saved_tensors
        flat_grad, flat_x = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        shape = (flat_grad.shape[1], flat_x.shape[1])
        grad = torch.mm(flat_grad.t(), flat_x, out=_slot("grad_masked", shape, grad_y.dtype, grad_y.device))
        out = (_slot("masked", shape, grad_y.dtype, grad_y.device), grad)
        merged, masked = merge_kernel(ctx.compiled)(
            weight, lora_A, lora_B, ctx.scale, ctx.transposed, held, grad=grad, out=out
        )
        grad_x = grad_y @ merged.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        # M * G is exact in G's dtype; s is applied to the thin products, not to a weight-sized one.
        grad_B = (masked @ lora_A.to(masked.dtype).t()).float().mul_(ctx.scale).to(lora_B.dtype)
        grad_A = (lora_B.to(masked.dtype).t() @ masked).float().mul_(ctx.scale).to(lora_A.dtype)
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None


class MaskedLoRALinear(SparseLinear):
    """A frozen, pruned ``nn.Linear`` or GPT-2 ``Conv1D`` with a LoRA update merged under its mask."""

    def __init__(
        self, base: nn.Linear | Conv1D, config: PSTConfig, lora: LoRAConfig, site: LayerSite | None = None
    ) -> None:
        super().__init__(base, config, site)
        self.scale = lora.alpha / lora.rank
        self.compiled = config.compile
        self.lora_A, self.lora_B = lora_factors(self, lora)
        # The frozen mask's held form and what it was selected under (see held_mask).
        self._frozen: tuple[torch.Tensor, int, torch.Tensor | None] | None = None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"method": [self.lora_A, self.lora_B]}

    def frozen_scores(self) -> torch.Tensor:
        """S = |W| (times the input norms), fp32, (out, in): fixed for the whole run."""
        weight = self.oriented_weight().detach().float()
        scale = self.column_scale()
        return weight.abs() if scale is None else weight.abs() * scale

    def _frozen_under(self) -> tuple[torch.Tensor, int]:
        """What the frozen mask is selected under: the count in force (a new host tensor whenever
        another count is put in force or a checkpoint loaded) and the input norms' version (a
        warm start writes them; a step never does)."""
        return self._pruned_host, -1 if self.input_stats is None else self.input_sq._version

    @torch.no_grad()
    def held_mask(self) -> torch.Tensor | None:
        """M in its held form (frozen_keep), selected the first time it is asked for under the
        count and input norms in force (the host syncs of a selection, once a run)."""
        count, norms = self._frozen_under()
        if self._frozen is None or self._frozen[0] is not count or self._frozen[1] != norms:
            keep = self.mask()
            weight = self.oriented_weight()
            if torch.equal(keep, weight != 0):
                held = None  # W's own zeros are the mask: nothing to keep
            elif keep.shape[1] % 8 == 0:
                held = pack_rows(keep)
            else:
                held = keep
            self._frozen = (count, norms, held)
        return self._frozen[2]

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool (out, in) mask in force, selected afresh from S alone (the update plays no part)."""
        scores = self.frozen_scores()
        return self.selection(scores).mask(scores)

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        update = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return self.frozen_scores(), self.oriented_weight().detach().float() + update

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # A training step reads the held mask; evaluation and calibration select afresh (a warm
        # start may be rewriting W under the same count).
        held = self.held_mask() if self.reuses_selection() else self.mask()
        if self.track_mask:
            with torch.no_grad():
                self.note_mask(frozen_keep(self.oriented_weight(), held))
        return MaskedLoRAFunction.apply(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scale,
            self.transposed,
            held,
            self.compiled,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, "
            f"mask={self.mask_kind.describe()}, sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )
