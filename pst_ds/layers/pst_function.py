"""PST's forward and backward for one layer, at about the cost of dense training of that layer.

Between forward and backward the layer keeps its input and the forward's mask packed to bits
(out*in/8 bytes, pst.saved_mask=bits), or with pst.saved_mask=recompute only the selection (a
threshold, or a few numbers per row or block), from which backward finds M in S again. Either
way backward recomputes W' from the weight, which ZeRO-3 gathers again for backward anyway.
The selection itself is the layer's, held for the optimizer step (layers/base.py). The math
(W is out x in; a = 1, or the input-norm scale of activation importance, importance.py; alpha
and beta arrive multiplied by the layer's unit, pst.factor_scale):

    W' = W + beta U V
    S  = a * |W'| + Ae Be      Ae = [a1 A, a2 R, a2 1], Be = [B; 1^T; C^T]
                               (a1 A B + a2 (R 1^T + 1 C^T) as one rank r_m + 2 product)
    M  = the mask kind's kept set of S (masks/kinds.py), e.g. top-k at the count in force
    y  = x (M * W')^T + b

    G   = dy^T x                          (the gradient of the masked weight)
    dS  = G * W'                          (straight-through: dL/dS = dL/dM)
    dW' = G * M + a * sign(W') * dS = G * (M + a |W'|)
    dU  = beta dW' V^T,  dV = beta U^T dW'
    [dA/a1, dR/a2] = dS [B^T, 1],   [dB/a1; dC/a2] = [A^T; 1^T] dS

With a learned threshold (masks/allocation.py) the layer also passes its keep fraction rho, whose
gradient is the mean of dS over the entries at the threshold, times the group's size.

With the importance frozen (masked LoRA: a ``HeldMask`` instead of a selection), M never moves:
no S, no selection, no dS, and M is read from its held form in the passes that merge:

    forward   M * W'                   backward   M * W', M * G (over G's own buffer)
    dW' = G * M,  dU = s dW' V^T,  dV = s U^T dW'

The element-wise blocks are plain functions; with ``pst.compile`` (the default) they run
through ``torch.compile``, which fuses each into one pass over the weight. That matters on
large matrices, where each eager element-wise op is a full read and write of the weight.
Every weight-sized result is written into the shared workspace (layers/workspace.py), never
into a fresh buffer, and no block returns it to autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks.kinds import Selection
from .pst_blocks import extended_importance_factors, kernels
from .workspace import WORKSPACE


@dataclass(frozen=True)
class PSTHyper:
    """The layer's fixed hyper-parameters, as the Function needs them."""

    alpha1: float
    alpha2: float
    beta: float
    transposed: bool  # a GPT-2 Conv1D weight, stored (in, out)
    compiled: bool  # the element-wise blocks through torch.compile
    threshold_band: float = 0.05  # learned thresholds: the band around t that estimates d/drho
    mask_bits: bool = False  # backward reads M from the forward's bits (PSTConfig.saves_mask_bits)
    # In bf16 / fp16: the forward multiplies by M * W' as its rounding plus the remainder (two
    # GEMMs), so an update below the dtype's resolution still reaches the output
    split_rounding: bool = False


@dataclass(frozen=True)
class HeldMask:
    """A mask that does not learn, in its held form: None where it is exactly W's own nonzeros,
    else packed bits (uint8, out x in/8), or itself (bool, where in is not a multiple of 8)."""

    form: torch.Tensor | None


@dataclass(frozen=True)
class StartPrior:
    """A revivable start's prior on S: the start's kept set (a ``HeldMask`` form, never None) and
    the bias on it in force (0-dim fp32, decaying to 0 over the schedule)."""

    keep: torch.Tensor
    bias: torch.Tensor

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"start_keep": self.keep, "start_bias": self.bias}


def weight_sized(slot: str, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scratch of the (out, in) shape ``like`` has, from the shared workspace."""
    return WORKSPACE.take(slot, tuple(like.shape), dtype, like.device)


def update_gradients(
    grad_updated: torch.Tensor, U: torch.Tensor, V: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dU, dV) = (s dW' V^T, s U^T dW'), the thin products in dW''s dtype and s applied to them,
    not to a weight-sized operand. A thin left factor is made contiguous first: BLAS took a third
    longer on the transposed view."""
    dtype = grad_updated.dtype
    grad_U = grad_updated.mm(V.to(dtype).t()).float().mul_(beta).to(U.dtype)
    grad_V = U.to(dtype).t().contiguous().mm(grad_updated).float().mul_(beta).to(V.dtype)
    return grad_U, grad_V


class PSTLinearFunction(torch.autograd.Function):
    """y = x (M * W')^T + b with the gradients above.

    ``select(scores, check)`` gives M's selection (the layer's: the kind at the state in force,
    held for the optimizer step in training), or is a ``HeldMask`` (the importance frozen: A, B,
    R, C, keep_fraction and col_scale are unused, and may be None); ``keep_fraction``
    (learned thresholds only) receives its gradient; ``record``, when a list (a logged step),
    receives the bool mask, and the scores are checked for NaN and inf.
    """

    @staticmethod
    def forward(  # noqa: N803 (paper names)
        ctx,
        x,
        weight,
        bias,
        U,
        V,
        A,
        B,
        R,
        C,
        keep_fraction,
        col_scale,
        start: StartPrior | None,
        hyper: PSTHyper,
        select: Callable[..., Selection] | HeldMask,
        record: list | None,
    ):
        blocks = kernels(hyper.compiled)
        ctx.held = isinstance(select, HeldMask)
        if ctx.held:
            shape = _oriented_shape(weight, hyper)
            out = (WORKSPACE.take("masked", shape, x.dtype, x.device), None)
            masked, _ = blocks["masked_by_held"](
                weight, U, V, hyper.beta, hyper.transposed, select.form, out=out
            )
            ctx.save_for_backward(x, weight, U, V, select.form)
            ctx.hyper, ctx.has_bias = hyper, bias is not None
            return F.linear(x, masked.to(x.dtype), bias)
        scale = None if col_scale is None else col_scale.float()
        updated, scores = _updated_and_scores(blocks, weight, U, V, A, B, R, C, scale, start, hyper)
        selection = select(scores, check=record is not None)
        given = selection.for_kernels(scores)
        if record is not None:
            record.append(given.mask(scores))
        # Backward needs M: the forward's own bits (out*in/8 bytes), or S again and the selection.
        from_bits = hyper.mask_bits and scores.shape[1] % 8 == 0
        split = hyper.split_rounding and x.dtype in (torch.bfloat16, torch.float16)
        # Split: M * W' in fp32 first, in a slot only backward uses (free during a forward).
        masked_slot = weight_sized(*(("grad_scores", scores) if split else ("masked", scores, x.dtype)))
        masked, bits = kernels(hyper.compiled, given.keep)["apply_mask"](
            updated, scores, *given.args, out=masked_slot, pack=from_bits
        )
        if split:
            halves = (weight_sized("masked", scores, x.dtype), weight_sized("grad_masked", scores, x.dtype))
            high, low = blocks["split_rounded"](masked, x.dtype, out=halves)
            masked = None
        del given, updated, scores
        ctx.save_for_backward(x, weight, U, V, A, B, R, C, scale, bits)
        ctx.selection = None if from_bits else selection  # a few numbers per matrix, row or group
        ctx.start = start
        ctx.hyper, ctx.has_bias = hyper, bias is not None
        ctx.keep_fraction = None if keep_fraction is None else (keep_fraction.shape, keep_fraction.dtype)
        if split:  # the low half's product is small: added in fp32, the sum rounded once
            y = F.linear(x, high).float() + F.linear(x, low).float()
            return (y if bias is None else y + bias.float()).to(x.dtype)
        return F.linear(x, masked.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.held:
            return _backward_under_held_mask(ctx, grad_out)
        x, weight, U, V, A, B, R, C, scale, bits = ctx.saved_tensors
        hyper, selection = ctx.hyper, ctx.selection
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_masked = torch.mm(
            grad_2d.t(), x_2d, out=_scratch("grad_masked", (grad_2d.shape[1], x_2d.shape[1]), x)
        )
        terms = (weight_sized("masked", grad_masked, grad_out.dtype), *_terms_scratch(grad_masked))
        grad_keep, blocks = None, kernels(hyper.compiled)
        if bits is not None:
            masked, grad_scores, grad_updated = blocks["backward_terms_from_bits"](
                grad_masked, weight, U, V, hyper.beta, hyper.transposed, scale, bits, out=terms
            )
        else:
            updated, scores = _updated_and_scores(blocks, weight, U, V, A, B, R, C, scale, ctx.start, hyper)
            given = selection.for_kernels(scores)
            masked, grad_scores, grad_updated = kernels(hyper.compiled, given.keep)["backward_terms"](
                grad_masked, updated, scores, scale, *given.args, out=terms
            )
            del given
            if ctx.keep_fraction is not None and ctx.needs_input_grad[9]:
                shape, dtype = ctx.keep_fraction
                grad_keep = torch.zeros(shape, dtype=dtype, device=x.device)
                if selection.args:  # a threshold is in force (not the dense warm-up)
                    band = blocks["keep_fraction_gradient"](
                        grad_scores, scores, selection.args[0], hyper.threshold_band
                    )
                    grad_keep = band.reshape(shape).to(dtype)
            del updated, scores
        del grad_masked
        grad_x = grad_out.matmul(masked.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        del masked
        r_m = A.shape[1]
        grad_U, grad_V = update_gradients(grad_updated, U, V, hyper.beta)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # W is frozen in PST; kept correct for anyone who unfreezes it
            grad_weight = (grad_updated.t() if hyper.transposed else grad_updated).to(weight.dtype, copy=True)
        del grad_updated
        Be_rows = torch.cat([B.float(), torch.ones_like(B[:1], dtype=torch.float32)])  # [B; 1^T]
        rows = grad_scores.mm(Be_rows.t())  # (out, r_m + 1)
        cols = torch.cat([A.float().t(), torch.ones_like(rows[:, :1]).t()]).mm(grad_scores)  # (r_m + 1, in)
        a1, a2 = hyper.alpha1, hyper.alpha2
        grad_A, grad_R = (a1 * rows[:, :r_m]).to(A.dtype), (a2 * rows[:, r_m]).to(R.dtype)
        grad_B, grad_C = (a1 * cols[:r_m]).to(B.dtype), (a2 * cols[r_m]).to(C.dtype)
        grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            grad_x,
            grad_weight,
            grad_bias,
            grad_U,
            grad_V,
            grad_A,
            grad_B,
            grad_R,
            grad_C,
            grad_keep,
            None,
            None,
            None,
            None,
            None,
        )


def _updated_and_scores(
    blocks: dict,
    weight: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    scale: torch.Tensor | None,
    start: StartPrior | None,
    hyper: PSTHyper,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', S) into the scores' scratch: forward's, and backward's when it selects again."""
    Ae, Be = extended_importance_factors(A, B, R, C, hyper.alpha1, hyper.alpha2)
    prior = {} if start is None else start.kwargs()
    return blocks["updated_and_scores"](
        weight, U, V, Ae, Be, hyper.beta, hyper.transposed, scale, out=_scores_scratch(weight, hyper), **prior
    )


def _backward_under_held_mask(ctx, grad_out: torch.Tensor) -> tuple:
    """Backward with the importance frozen: G, then M * W' and M * G in one pass, dx and the
    update's gradients; nothing else trains."""
    x, weight, U, V, held = ctx.saved_tensors
    hyper = ctx.hyper
    grad_2d, x_2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    grad = torch.mm(grad_2d.t(), x_2d, out=_scratch("grad_masked", (grad_2d.shape[1], x_2d.shape[1]), x))
    out = (weight_sized("masked", grad, grad_out.dtype), grad)
    masked, masked_grad = kernels(hyper.compiled)["masked_by_held"](
        weight, U, V, hyper.beta, hyper.transposed, held, grad=grad, out=out
    )
    grad_x = grad_out.matmul(masked.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
    grad_U, grad_V = update_gradients(masked_grad, U, V, hyper.beta)
    grad_weight = None
    if ctx.needs_input_grad[1]:  # W is frozen; kept correct for anyone who unfreezes it
        grad_weight = (masked_grad.t() if hyper.transposed else masked_grad).to(weight.dtype, copy=True)
    grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (grad_x, grad_weight, grad_bias, grad_U, grad_V, *([None] * 10))


def _scratch(slot: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    return WORKSPACE.take(slot, shape, like.dtype, like.device)


def _oriented_shape(weight: torch.Tensor, hyper: PSTHyper) -> tuple[int, int]:
    rows, cols = weight.shape
    return (cols, rows) if hyper.transposed else (rows, cols)


def _scores_scratch(weight: torch.Tensor, hyper: PSTHyper) -> tuple[torch.Tensor, torch.Tensor]:
    shape = _oriented_shape(weight, hyper)
    return tuple(WORKSPACE.take(slot, shape, torch.float32, weight.device) for slot in ("updated", "scores"))


def _terms_scratch(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_sized("grad_scores", like), weight_sized("grad_updated", like)
