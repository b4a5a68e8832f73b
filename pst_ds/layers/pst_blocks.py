"""The element-wise blocks of PST's layer (pst_function.py runs them): W' and S, the masked
weight, the split rounding, backward's terms and a held mask's merge, as plain functions, and
``kernels``, which gives them eager or fused by ``torch.compile`` into one pass over the weight
each, writing into the buffers given."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..masks.bits import pack_rows, unpacked_groups


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
