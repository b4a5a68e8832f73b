"""SparseGPT (Frantar & Alistarh, ICML 2023): prune one weight matrix and update the weights it
keeps so that the layer's output on the calibration inputs changes least.

W is out x in, H = X^T X / tokens (in x in) from the layer's calibration inputs. Per row the
OBS step for pruning column i (with the rows of the inverse Hessian's upper Cholesky factor,
Hinv, which handle the columns still to come) is

    err = (w_i - q_i) / Hinv[i, i]          q_i = 0 if pruned, else w_i
    w[i:] -= err * Hinv[i, i:]

Columns are swept in blocks of ``block_columns``; updates to later blocks are applied once per
block (the paper's lazy batching). The pruned set is chosen adaptively at the start of each
block by the OBS saliency w^2 / Hinv[i, i]^2 of the weights as updated so far, with exact
counts: matrix scope prunes a share of the matrix's count in every block, row scope a share of
each row's, and N:M prunes M - N of every M columns as the sweep reaches them.
"""

from __future__ import annotations

import torch

from ..masks.kinds import NM, MaskKind


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the upper Cholesky factor of (H + damp mean(diag H) I)^-1, the dead columns' mask).

    A dead input (never non-zero in calibration) gets H_ii = 1: its weights are pruned first."""
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _cumulative(count: torch.Tensor, start: int, end: int, cols: int) -> torch.Tensor:
    """Of ``count`` pruned entries spread over ``cols`` columns, those due in [start, end)."""
    return count * end // cols - count * start // cols


def _block_pruned(saliency: torch.Tensor, pruned: torch.Tensor, start: int, cols: int, per_row: bool):
    """Bool: the block's entries of least saliency, as many as due (per row or in the whole block)."""
    end = start + saliency.shape[1]
    if per_row:
        due = _cumulative(pruned.to(saliency.device), start, end, cols)
        order = saliency.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        return rank < due[:, None]
    due = int(_cumulative(pruned, start, end, cols))
    chosen = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    chosen[saliency.reshape(-1).argsort(stable=True)[:due]] = True
    return chosen.view_as(saliency)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    kind: MaskKind,
    pruned: torch.Tensor,
    block_columns: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The pruned and updated (out, in) weight, fp32, with exact zeros where pruned.

    ``kind`` and ``pruned`` are the layer's mask kind and the count(s) it prunes: topk (per
    matrix or per row, learned thresholds included) or nm."""
    if not kind.obs_prunable:
        raise ValueError(f"sparsegpt supports topk and nm masks, not {kind.name}")
    nm = isinstance(kind, NM)
    if nm and block_columns % kind.m:
        raise ValueError(f"oneshot.block_columns={block_columns} must be a multiple of pst.mask_m={kind.m}")
    W = weight.detach().float().clone()
    rows, cols = W.shape
    hinv, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0
    for start in range(0, cols, block_columns):
        end = min(start + block_columns, cols)
        block, hinv_block = W[:, start:end].clone(), hinv[start:end, start:end]
        diag = torch.diag(hinv_block)
        errors = torch.zeros_like(block)
        if nm:
            prune = torch.zeros_like(block, dtype=torch.bool)
        else:
            prune = _block_pruned(block**2 / diag**2, pruned, start, cols, kind.per_row)
        for i in range(end - start):
            if nm and i % kind.m == 0:
                group = block[:, i : i + kind.m] ** 2 / diag[i : i + kind.m] ** 2
                count = max(0, group.shape[1] - kind.n)
                least = group.argsort(dim=1, stable=True)[:, :count]
                prune[:, i : i + group.shape[1]].scatter_(1, least, True)
            column = block[:, i]
            kept = torch.where(prune[:, i], torch.zeros_like(column), column)
            errors[:, i] = (column - kept) / hinv_block[i, i]
            block[:, i:] -= errors[:, i, None] * hinv_block[i, i:][None, :]
            block[:, i] = kept  # exact zeros (the update leaves rounding error there)
        W[:, start:end] = block
        W[:, end:] -= errors @ hinv[start:end, end:]
    return W
