"""Mask kinds: how a pruned layer picks its kept set from its importance scores S (out x in).

A kind does one job, in two halves:

    select(S, pruned) -> Selection   the few numbers the mask needs (a threshold, one per row,
                                     a column choice per block), found outside the kernels
    Selection.keep(S, *args) -> M    the bool mask: element-wise in S (or over a group of M
                                     neighbours), so torch.compile fuses it into S's own pass

Forward, backward, the reported mask and export all call these two, so they cannot disagree.
``pruned`` is the layer's mask state: how many entries it prunes now (one count, or one per
row), written by the sparsity controller, saved in checkpoints and read back by export.

    topk       exact top-k of S per matrix, or per row (the same count in every output row)
    threshold  topk whose per-matrix (or per-row) counts come from learned thresholds (masks/allocation.py)
    nm         N:M: the N largest S of every M consecutive inputs of a row (2:4 by default)
    vnm        V:N:M with N = 2: in each block of V rows x M inputs, the 4 columns of largest
               summed S, then 2:4 inside them in every row (sparsity 1 - 2/M)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import PSTConfig
from .select import (
    check_finite,
    keep_from,
    keep_n_of_m,
    keep_rows,
    num_pruned,
    select_pruned,
    select_row_thresholds,
)


def keep_all(scores: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool)


def keep_vnm(scores: torch.Tensor, columns: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """2:M among each row's chosen columns; ``columns`` (row blocks, in) marks each block's."""
    rows, cols = scores.shape
    pad = (-rows) % v
    blocks = torch.nn.functional.pad(scores, (0, 0, 0, pad)) if pad else scores
    chosen = columns[:, None, :]  # broadcast over the block's rows, never expanded
    among_chosen = torch.where(chosen, blocks.view(-1, v, cols), float("-inf")).view(-1, cols)
    keep = keep_n_of_m(among_chosen, 2, m).view(-1, v, cols) & chosen
    return keep.view(-1, cols)[:rows]


def keep_given(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask


@dataclass(frozen=True)
class Selection:
    """A mask as ``keep(scores, *args)``: ``args`` are small tensors or ints.

    ``fusable``: whether compiled kernels should evaluate ``keep`` themselves. The group ranks
    of nm and vnm are not: inductor's CPU code for them took up to 11.5x the eager time (mean
    of 5 calls on a 1536x576 matrix), so their mask is made eagerly, once, and handed in.
    """

    keep: Callable[..., torch.Tensor]
    args: tuple = ()
    fusable: bool = True

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return self.keep(scores, *self.args)

    def for_kernels(self, scores: torch.Tensor) -> Selection:
        """This selection as the compiled kernels take it."""
        return self if self.fusable else Selection(keep_given, (self.mask(scores),))


DENSE = Selection(keep_all)


class MaskKind:
    """One way to pick the kept set. Subclasses set ``name`` and implement ``pruned_count`` and
    ``_select`` (the dense case is handled here, once for all kinds)."""

    name = ""
    learned = False  # True: the counts are allocated from trained thresholds (threshold kind)
    per_row = False  # True: the layer's mask state holds one count per output row

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        """The mask state at the scheduled ``sparsity``: entries pruned (long, () or (rows,))."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        """The mask of ``scores`` with ``pruned`` in force; dense when nothing is pruned.
        Raises NonFiniteScoresError on NaN or infinite scores either way (training diverged)."""
        if not bool(pruned.any()):
            check_finite(scores.detach().reshape(-1))
            return DENSE
        return self._select(scores, pruned)

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        raise NotImplementedError

    def describe(self) -> dict:
        """What export reports about the pattern."""
        return {"kind": self.name}

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        """Why ``keep`` is not exactly this kind's mask with ``pruned``, or None if it is."""
        expected = int(pruned.sum())
        actual = keep.numel() - int(keep.sum())
        return None if actual == expected else f"{actual:,} entries pruned, {expected:,} recorded"


class TopK(MaskKind):
    """Exact top-k of S over the whole matrix or within each row."""

    name = "topk"

    def __init__(self, scope: str = "matrix") -> None:
        self.per_row = scope == "row"
        self.scope = scope

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        if self.per_row:
            return torch.full((rows,), num_pruned(cols, sparsity), dtype=torch.long)
        return torch.tensor(num_pruned(rows * cols, sparsity), dtype=torch.long)

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        if self.per_row:
            threshold = select_row_thresholds(scores, pruned)
            return Selection(keep_rows, (threshold.value, threshold.first_kept_tie))
        threshold = select_pruned(scores, int(pruned))
        return Selection(keep_from, (threshold.value, threshold.first_kept_tie))

    def describe(self) -> dict:
        return {"kind": self.name, "scope": self.scope}

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        if self.per_row:
            actual = keep.shape[1] - keep.sum(1)
            wrong = torch.nonzero(actual != pruned.to(actual.device)).reshape(-1)
            if wrong.numel():
                r = int(wrong[0])
                return f"row {r} prunes {int(actual[r])}, {int(pruned[r])} recorded"
        return super().pattern_problem(keep, pruned)


class LearnedThreshold(TopK):
    """Top-k at counts that the controller allocates from each matrix's (or row's) trained
    threshold; the layer passes their keep fractions to autograd (see allocation.py)."""

    name = "threshold"
    learned = True


class NM(MaskKind):
    """N of every M consecutive inputs of a row; dense while the schedule holds sparsity 0."""

    name = "nm"

    def __init__(self, n: int = 2, m: int = 4) -> None:
        self.n, self.m = n, m

    def kept_per_row(self, cols: int) -> int:
        return cols // self.m * self.n + min(self.n, cols % self.m)

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        return torch.tensor(0 if sparsity == 0 else rows * (cols - self.kept_per_row(cols)), dtype=torch.long)

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        check_finite(scores.detach().reshape(-1))
        return Selection(keep_n_of_m, (self.n, self.m), fusable=False)

    def describe(self) -> dict:
        return {"kind": self.name, "n": self.n, "m": self.m}

    def _group_problem(self, keep: torch.Tensor, limit: int, what: str) -> str | None:
        rows, cols = keep.shape
        full = cols // self.m * self.m
        kept = keep[:, :full].reshape(rows, -1, self.m).sum(-1)
        bad = torch.nonzero(kept != limit)
        if bad.numel():
            r, g = (int(i) for i in bad[0])
            return f"row {r}, inputs {g * self.m}-{g * self.m + self.m - 1} keep {int(kept[r, g])} {what}"
        if full < cols and bool((keep[:, full:].sum(1) != min(limit, cols - full)).any()):
            return f"a row's last {cols - full} inputs do not keep {min(limit, cols - full)}"
        return None

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        if not bool(pruned.any()):
            return super().pattern_problem(keep, pruned)
        return self._group_problem(keep, self.n, f"(not {self.n} of {self.m})") or super().pattern_problem(
            keep, pruned
        )


class VNM(NM):
    """V:2:M: 4 chosen columns of every M per block of V rows, then 2:4 among them per row."""

    name = "vnm"

    def __init__(self, v: int = 64, m: int = 5) -> None:
        super().__init__(n=2, m=m)
        self.v = v

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        check_finite(scores.detach().reshape(-1))
        rows, cols = scores.shape
        pad = (-rows) % self.v  # a shorter last block: zero rows add nothing to the sums
        block_sums = torch.nn.functional.pad(scores.detach(), (0, 0, 0, pad)).view(-1, self.v, cols).sum(1)
        columns = keep_n_of_m(block_sums, 4, self.m)
        return Selection(keep_vnm, (columns, self.v, self.m), fusable=False)

    def describe(self) -> dict:
        return {"kind": self.name, "v": self.v, "n": self.n, "m": self.m}

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        if not bool(pruned.any()):
            return super().pattern_problem(keep, pruned)
        rows, cols = keep.shape
        pad = (-rows) % self.v
        used = torch.nn.functional.pad(keep, (0, 0, 0, pad)).view(-1, self.v, cols).any(1)  # (blocks, in)
        padded = torch.nn.functional.pad(used, (0, (-cols) % self.m)).view(used.shape[0], -1, self.m)
        if bool((padded.sum(-1) > 4).any()):
            b, g = (int(i) for i in torch.nonzero(padded.sum(-1) > 4)[0])
            first_row, first_input = b * self.v, g * self.m
            return f"the block at row {first_row}, input {first_input} uses more than 4 columns"
        return super().pattern_problem(keep, pruned)


class StraightThroughMask(torch.autograd.Function):
    """M = a kind's mask of S in the forward; dL/dS = dL/dM in the backward (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, kind: MaskKind, pruned: torch.Tensor) -> torch.Tensor:
        return kind.select(scores, pruned).mask(scores).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad_mask, None, None


def mask_kind(config: PSTConfig) -> MaskKind:
    """The mask kind ``config.mask`` names, with its parameters."""
    if config.mask == "topk":
        return TopK(config.mask_scope)
    if config.mask == "threshold":
        return LearnedThreshold(config.mask_scope)
    if config.mask == "nm":
        return NM(config.mask_n, config.mask_m)
    return VNM(config.mask_v, config.mask_m)
