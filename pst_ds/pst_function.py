"""PST's forward and backward for one layer, at about the cost of dense training of that layer.

Nothing weight-sized is kept between forward and backward: only the layer input, the
factors and the mask's threshold (one value, one index). Backward recomputes W' and S from
the weight, which ZeRO-3 gathers again for backward anyway. The math (W is out x in):

    W' = W + beta U V
    S  = |W'| + Ae Be          Ae = [a1 A, a2 R, a2 1], Be = [B; 1^T; C^T]
                               (a1 A B + a2 (R 1^T + 1 C^T) as one rank r_m + 2 product)
    t  = threshold of S at the sparsity in force (masks.select_threshold), M = S > t (+ kept ties)
    y  = x (M * W')^T + b

    G   = dy^T x                          (the gradient of the masked weight)
    dS  = G * W'                          (straight-through: dL/dS = dL/dM)
    dW' = G * M + sign(W') * dS = G * (M + |W'|)
    dU  = beta dW' V^T,  dV = beta U^T dW'
    [dA/a1, dR/a2] = dS [B^T, 1],   [dB/a1; dC/a2] = [A^T; 1^T] dS

The element-wise blocks are plain functions; with ``pst.compile`` (the default) they run
through ``torch.compile``, which fuses each into one pass over the weight. That matters on
large matrices, where each eager element-wise op is a full read and write of the weight.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .masks import keep_from, select_threshold

if TYPE_CHECKING:
    from .layer import PSTLinear


def extended_importance_factors(
    A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, C: torch.Tensor, alpha1: float, alpha2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ae, Be) with Ae Be = alpha1 A B + alpha2 (R 1^T + 1 C^T), all fp32."""
    ones_out = torch.ones_like(R, dtype=torch.float32)[:, None]
    ones_in = torch.ones_like(C, dtype=torch.float32)[None, :]
    Ae = torch.cat([alpha1 * A.float(), alpha2 * R.float()[:, None], alpha2 * ones_out], dim=1)
    Be = torch.cat([B.float(), ones_in, C.float()[None, :]], dim=0)
    return Ae, Be


def low_rank_product(a: torch.Tensor, b: torch.Tensor, unrolled: bool = False) -> torch.Tensor:
    """a @ b for a thin inner dimension (a rank-r update), fp32.

    Unrolled into r broadcast products, ``torch.compile`` fuses it into the element-wise pass
    around it, so no weight-sized product is written and read back (and no bias copy as in addmm).
    """
    if not unrolled:
        return a.float() @ b.float()
    a, b = a.float(), b.float()
    return sum(a[:, j, None] * b[j] for j in range(a.shape[1]))


def updated_and_scores(
    weight: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    Ae: torch.Tensor,
    Be: torch.Tensor,
    beta: float,
    transposed: bool,
    unrolled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', S), both (out, in) fp32."""
    w = weight.t() if transposed else weight
    updated = w.float() + beta * low_rank_product(U, V, unrolled)
    return updated, updated.abs() + low_rank_product(Ae, Be, unrolled)


def apply_mask(
    updated: torch.Tensor, scores: torch.Tensor, value: torch.Tensor, first_kept_tie: int
) -> torch.Tensor:
    """M * W' (fp32)."""
    return updated * keep_from(scores, value, first_kept_tie)


def _apply_mask_in_place(
    updated: torch.Tensor, scores: torch.Tensor, value: torch.Tensor, first_kept_tie: int
) -> torch.Tensor:
    return updated.mul_(keep_from(scores, value, first_kept_tie))  # eager: spares a weight-sized buffer


def backward_terms(
    grad_masked: torch.Tensor,
    updated: torch.Tensor,
    scores: torch.Tensor,
    value: torch.Tensor,
    first_kept_tie: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M * W', dS, dW') from G = dL/d(M * W') and W', S as recomputed by forward's own kernel
    (the same kernel, so the same bits: the mask cannot differ between forward and backward)."""
    keep = keep_from(scores, value, first_kept_tie).float()
    grad = grad_masked.float()
    return updated * keep, grad * updated, grad * (keep + updated.abs())


_EAGER = {
    "updated_and_scores": updated_and_scores,
    "apply_mask": _apply_mask_in_place,
    "backward_terms": backward_terms,
}
_compiled: dict = {}


def kernels(compiled: bool) -> dict:
    """The element-wise blocks, eager or through ``torch.compile`` (fused into single passes)."""
    if not compiled:
        return _EAGER
    if not _compiled:  # dynamic shapes: one compilation serves every layer shape
        fused = {  # in-place writes to an input break fusion: the mask is applied out of place
            "updated_and_scores": partial(updated_and_scores, unrolled=True),
            "apply_mask": apply_mask,
            "backward_terms": backward_terms,
        }
        _compiled.update({name: torch.compile(fn, dynamic=True) for name, fn in fused.items()})
    return _compiled


class PSTLinearFunction(torch.autograd.Function):
    """y = x (M * W')^T + b with the gradients above; ``layer`` supplies the hyper-parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, U, V, A, B, R, C, layer: PSTLinear):  # noqa: N803 (paper names)
        Ae, Be = extended_importance_factors(A, B, R, C, layer.alpha1, layer.alpha2)
        run = kernels(layer.compiled)
        updated, scores = run["updated_and_scores"](weight, U, V, Ae, Be, layer.beta, layer.transposed)
        threshold = select_threshold(scores, layer.sparsity)
        if layer.track_mask:
            layer.note_mask(keep_from(scores, threshold.value, threshold.first_kept_tie))
        masked = run["apply_mask"](updated, scores, threshold.value, threshold.first_kept_tie)
        del scores
        ctx.save_for_backward(x, weight, U, V, A, B, R, C, threshold.value)
        ctx.layer, ctx.has_bias, ctx.first_kept_tie = layer, bias is not None, threshold.first_kept_tie
        return F.linear(x, masked.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, U, V, A, B, R, C, value = ctx.saved_tensors
        layer = ctx.layer
        Ae, Be = extended_importance_factors(A, B, R, C, layer.alpha1, layer.alpha2)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_masked = grad_2d.t().mm(x_2d)  # (out, in)
        run = kernels(layer.compiled)
        updated, scores = run["updated_and_scores"](weight, U, V, Ae, Be, layer.beta, layer.transposed)
        masked, grad_scores, grad_updated = run["backward_terms"](
            grad_masked, updated, scores, value, ctx.first_kept_tie
        )
        del updated, scores, grad_masked
        grad_x = grad_out.matmul(masked.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        del masked
        beta, r_m = layer.beta, A.shape[1]
        grad_U = (beta * grad_updated.mm(V.float().t())).to(U.dtype)
        grad_V = (beta * U.float().t().mm(grad_updated)).to(V.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # W is frozen in PST; kept correct for anyone who unfreezes it
            grad_weight = (grad_updated.t() if layer.transposed else grad_updated).to(weight.dtype)
        del grad_updated
        rows = grad_scores.mm(Be[: r_m + 1].t())  # Be[:r_m + 1] = [B; 1^T]: (out, r_m + 1)
        cols = (
            torch.cat([A.float(), torch.ones_like(rows[:, :1])], dim=1).t().mm(grad_scores)
        )  # (r_m + 1, in)
        a1, a2 = layer.alpha1, layer.alpha2
        grad_A, grad_R = (a1 * rows[:, :r_m]).to(A.dtype), (a2 * rows[:, r_m]).to(R.dtype)
        grad_B, grad_C = (a1 * cols[:r_m]).to(B.dtype), (a2 * cols[r_m]).to(C.dtype)
        grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, grad_U, grad_V, grad_A, grad_B, grad_R, grad_C, None
