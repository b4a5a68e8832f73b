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
from functools import partial

import torch
import torch.nn.functional as F

from ..masks.bits import pack_rows, unpacked_groups
from ..masks.kinds import Selection
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
    col_scale: torch.Tensor | None,
    out: tuple[torch.Tensor, torch.Tensor] | None,
    unrolled: bool = False,
    start_keep: torch.Tensor | None = None,
    start_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', S), both (out, in) fp32, written into ``out`` (None: fresh tensors). With a start prior
    (``start_keep``, a ``HeldMask`` form of the start's kept set, and ``start_bias``, 0-dim), S
    also gets the bias on that set."""
    updated = updated_weight(weight, U, V, beta, transposed, unrolled)
    magnitude = updated.abs() if col_scale is None else updated.abs() * col_scale
    scores = magnitude + low_rank_product(Ae, Be, unrolled)
    if start_keep is not None:
        scores = scores + start_bias * held_keep(updated, start_keep)
    out = out or (None, None)
    return _store(out[0], updated), _store(out[1], scores)


def _store(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value`` written into ``buffer`` (fused into the pass that computes it), or itself, in
    (out, in) row-major order either way (eager ops follow a Conv1D weight's transposed layout)."""
    return value.contiguous() if buffer is None else buffer.copy_(value)


def updated_weight(
    weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, beta: float, transposed: bool, unrolled: bool
) -> torch.Tensor:
    """W' = W + beta U V, (out, in) fp32."""
    w = weight.t() if transposed else weight
    return w.float() + beta * low_rank_product(U, V, unrolled)


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


def held_keep(oriented_weight: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
    """M, bool (out, in), from a ``HeldMask``'s form."""
    if held is None:
        return oriented_weight != 0
    if held.dtype == torch.bool:
        return held
    return unpacked_groups(held).reshape(oriented_weight.shape)


def masked_by_held(
    weight: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    beta: float,
    transposed: bool,
    held: torch.Tensor | None,
    grad: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    unrolled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M * W', and M * G if ``grad`` is given), (out, in), M read from its held form: one pass
    over W. M * G is exact in G's dtype, so backward writes it over G's own buffer."""
    keep = held_keep(weight.t() if transposed else weight, held)
    masked = updated_weight(weight, U, V, beta, transposed, unrolled) * keep
    out = out or (None, None)
    return _store(out[0], masked), None if grad is None else _store(out[1], grad.float() * keep)


def apply_mask(
    keep: Callable,
    updated: torch.Tensor,
    scores: torch.Tensor,
    *selection,
    out: torch.Tensor | None,
    pack: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M * W' in ``out``'s dtype, M packed to bits for backward if ``pack``), M = keep(S, *selection).
    Without ``out`` (eager), M * W' is written over W'."""
    mask = keep(scores, *selection)
    masked = updated.mul_(mask) if out is None else out.copy_(updated * mask)
    return masked, pack_rows(mask) if pack else None


def split_rounded(
    value: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) in ``dtype`` with high + low = ``value`` (fp32) to about twice the dtype's
    bits: high is value rounded, low the rounding's remainder."""
    high = value.to(dtype)
    low = (value - high.float()).to(dtype)
    out = out or (None, None)
    return _store(out[0], high), _store(out[1], low)


def backward_terms(
    keep: Callable,
    grad_masked: torch.Tensor,
    updated: torch.Tensor,
    scores: torch.Tensor,
    col_scale: torch.Tensor | None,
    *selection,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M * W', dS, dW') from G = dL/d(M * W') and W', S as recomputed by forward's own kernel
    (the same kernel, so the same bits: the mask cannot differ between forward and backward)."""
    return _backward_terms(keep(scores, *selection), grad_masked, updated, col_scale, out)


def backward_terms_from_bits(
    grad_masked: torch.Tensor,
    weight: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    beta: float,
    transposed: bool,
    col_scale: torch.Tensor | None,
    bits: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M * W', dS, dW') with M the forward's own mask, saved as bits: no S, no selection."""
    updated = updated_weight(weight, U, V, beta, transposed, unrolled=True)
    mask = unpacked_groups(bits).reshape(updated.shape)
    return _backward_terms(mask, grad_masked, updated, col_scale, out)


def _backward_terms(mask, grad_masked, updated, col_scale, out):
    mask, grad = mask.float(), grad_masked.float()
    magnitude = updated.abs() if col_scale is None else updated.abs() * col_scale
    out = out or (None, None, None)
    terms = updated * mask, grad * updated, grad * (mask + magnitude)
    return tuple(_store(buffer, term) for buffer, term in zip(out, terms, strict=True))


def keep_fraction_gradient(
    grad_scores: torch.Tensor, scores: torch.Tensor, value: torch.Tensor, band: float
) -> torch.Tensor:
    """dL/drho per group (the matrix, or each row when ``value`` is (out, 1)): the group's size
    times the mean of dL/dM over the entries with |S - t| <= band |t| (masks/allocation.py)."""
    near = (scores - value).abs() <= band * value.abs()
    dims = (0, 1) if value.dim() == 0 else (1,)
    count = near.sum(dims).clamp(min=1)
    size = scores.numel() if value.dim() == 0 else scores.shape[1]
    return size * (grad_scores * near).sum(dims) / count


_compiled: dict = {}


def _allow_a_variant_per_mask_kind() -> None:
    """Each mask test and dtype is one more compiled variant of the same function; dynamo's
    default limit of 8 would send a process that uses several kinds back to eager. torch has no
    per-function setting for it, so this raises the process-wide one (never lowers it)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


BLOCKS = {
    "updated_and_scores": updated_and_scores,
    "apply_mask": apply_mask,
    "split_rounded": split_rounded,
    "backward_terms": backward_terms,
    "backward_terms_from_bits": backward_terms_from_bits,
    "keep_fraction_gradient": keep_fraction_gradient,
    "masked_by_held": masked_by_held,
}


def kernels(compiled: bool, keep: Callable | None = None) -> dict:
    """The element-wise blocks (the masking ones for mask test ``keep``), eager or through
    ``torch.compile``: fused into single passes that write into the buffers given, with dynamic
    shapes for every layer shape. Eager blocks return fresh tensors instead: each eager op writes
    one anyway, and a copy into the buffer would be one more pass."""
    blocks = {name: _fresh(fn) if name in WRITING else fn for name, fn in BLOCKS.items()}
    if compiled:
        if not _compiled:
            _allow_a_variant_per_mask_kind()
            _compiled.update({name: torch.compile(fn, dynamic=True) for name, fn in BLOCKS.items()})
            # Inductor keeps a cast down and back up in fp32 unless told to round: the split must.
            _compiled["split_rounded"] = torch.compile(
                split_rounded, dynamic=True, options={"emulate_precision_casts": True}
            )
        unrolled = {
            name: partial(_compiled[name], unrolled=True) for name in ("updated_and_scores", "masked_by_held")
        }
        blocks = {**_compiled, **unrolled}
    if keep is not None:  # bound outside the compiled function: its code object stays one
        blocks["apply_mask"] = partial(blocks["apply_mask"], keep)
        blocks["backward_terms"] = partial(blocks["backward_terms"], keep)
    return blocks


WRITING = (
    "updated_and_scores",
    "apply_mask",
    "split_rounded",
    "backward_terms",
    "backward_terms_from_bits",
    "masked_by_held",
)


def _fresh(block: Callable) -> Callable:
    def run(*args, out=None, **kwargs):
        return block(*args, out=None, **kwargs)

    return run


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
