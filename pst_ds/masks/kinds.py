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

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
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
    if torch.compiler.is_compiling():  # fused: each row reads its block's columns by index
        chosen = columns[torch.arange(rows, device=scores.device) // v]
        return keep_n_of_m(torch.where(chosen, scores, float("-inf")), 2, m) & chosen
    pad = (-rows) % v
    blocks = torch.nn.functional.pad(scores, (0, 0, 0, pad)) if pad else scores
    chosen = columns[:, None, :]  # broadcast over the block's rows, never expanded
    among_chosen = torch.where(chosen, blocks.view(-1, v, cols), float("-inf")).view(-1, cols)
    keep = keep_n_of_m(among_chosen, 2, m).view(-1, v, cols) & chosen
    return keep.view(-1, cols)[:rows]


def keep_given(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask


def keep_into_pattern(scores: torch.Tensor, pattern: Selection, pruned: int) -> torch.Tensor:
    """A ramp into a grouped pattern: everything the pattern keeps, and of what it prunes all but
    the ``pruned`` entries of smallest S. At the pattern's own count this is the pattern."""
    kept = pattern.mask(scores)
    detached = scores.detach()
    outside = torch.where(kept, torch.finfo(detached.dtype).max, detached)
    threshold = select_pruned(outside, pruned)
    return keep_from(outside, threshold.value, threshold.first_kept_tie)


@dataclass(frozen=True)
class Selection:
    """A mask as ``keep(scores, *args)``: ``args`` are small tensors or ints (or, ramping into a
    pattern, the pattern's own Selection).

    ``fusable``: whether compiled kernels should evaluate ``keep`` themselves. A ramp into a
    pattern is not (it selects among the pattern's pruned entries): its mask is made eagerly,
    once, and handed in.
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
    """One way to pick the kept set. Subclasses set ``name``, the flags that differ, and implement
    ``from_config``, ``pruned_count`` and ``_select`` (the dense case is handled here, once for
    all kinds); ``check`` refuses the PST settings a kind cannot give."""

    name: ClassVar[str] = ""
    learned: ClassVar[bool] = False  # the counts are allocated from trained thresholds
    scoped: ClassVar[bool] = False  # pst.mask_scope applies: one count per matrix or per row
    obs_prunable: ClassVar[bool] = False  # SparseGPT's sweep can choose this pattern
    grouped: ClassVar[bool] = False  # a pattern within groups of inputs, beyond the pruned count
    per_row = False  # this instance's mask state holds one count per output row

    @classmethod
    def from_config(cls, config: PSTConfig) -> MaskKind:
        raise NotImplementedError

    @classmethod
    def from_description(cls, described: dict) -> MaskKind:
        """The kind ``describe()`` wrote (pst_sparsity.json's ``mask``): it records every
        argument of the kind's constructor."""
        return cls(**{name: described[name] for name in inspect.signature(cls).parameters})

    @classmethod
    def check(cls, config: PSTConfig) -> None:
        """Refuse (ConfigError) settings of ``config`` this kind cannot give."""

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        """The mask state at the scheduled ``sparsity``: entries pruned (long, () or (rows,))."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, pruned: torch.Tensor, check: bool = True) -> Selection:
        """The mask of ``scores`` with ``pruned`` (the host copy of the mask state) in force;
        dense when nothing is pruned. With ``check``, NaN or infinite scores raise
        NonFiniteScoresError (training diverged); that test waits for the device, so training
        runs it on logged steps only, except where the selection counts entries anyway (top-k of
        a whole matrix checks at every selection)."""
        dense = not bool(pruned.any())
        if check and (dense or not self.checks_while_selecting):
            check_finite(scores.detach().reshape(-1))
        return DENSE if dense else self._select(scores, pruned)

    @property
    def checks_while_selecting(self) -> bool:
        """Whether ``_select`` itself refuses non-finite scores (it must count them anyway)."""
        return False

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        raise NotImplementedError

    def describe(self) -> dict:
        """What export reports about the pattern."""
        return {"kind": self.name}

    def selection_cost(self) -> tuple[float, float]:
        """For the cost model (train/cost.py): (bytes per entry the selection reads and writes,
        element-wise FLOPs per entry of the mask test). Top-k brackets the k-th value (a
        finiteness sum, two compares, the bracket's entries)."""
        return 14.0, 2.0

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        """Why ``keep`` is not exactly this kind's mask with ``pruned``, or None if it is."""
        expected = int(pruned.sum())
        actual = keep.numel() - int(keep.sum())
        return None if actual == expected else f"{actual:,} entries pruned, {expected:,} recorded"


class TopK(MaskKind):
    """Exact top-k of S over the whole matrix or within each row."""

    name = "topk"
    scoped = True
    obs_prunable = True

    @classmethod
    def from_config(cls, config: PSTConfig) -> MaskKind:
        return cls(config.mask_scope)

    def __init__(self, scope: str = "matrix") -> None:
        self.per_row = scope == "row"
        self.scope = scope

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        if self.per_row:
            return torch.full((rows,), num_pruned(cols, sparsity), dtype=torch.long)
        return torch.tensor(num_pruned(rows * cols, sparsity), dtype=torch.long)

    @property
    def checks_while_selecting(self) -> bool:
        return not self.per_row  # select_pruned counts entries around the k-th: it checks too

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        if self.per_row:
            threshold = select_row_thresholds(scores, pruned, check=False)
            return Selection(keep_rows, (threshold.value, threshold.first_kept_tie))
        threshold = select_pruned(scores, int(pruned))
        return Selection(keep_from, (threshold.value, threshold.first_kept_tie))

    def describe(self) -> dict:
        return {"kind": self.name, "scope": self.scope}

    def selection_cost(self) -> tuple[float, float]:
        # a row scope runs a kthvalue per row and counts the entries below and tied
        return (20.0 if self.per_row else 14.0), 2.0

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
    """N of every M consecutive inputs of a row. Below the pattern's own sparsity (a schedule
    ramping into it) the pattern's kept entries stay and of the rest only the smallest S are
    pruned, as many as the schedule says: the pattern comes into force gradually, not at once."""

    name = "nm"
    obs_prunable = True
    grouped = True

    def __init__(self, n: int = 2, m: int = 4) -> None:
        self.n, self.m = n, m

    def selection_cost(self) -> tuple[float, float]:
        # no selection pass: the mask is element-wise in S (each group's ranks)
        return 0.0, 16.0

    @classmethod
    def from_config(cls, config: PSTConfig) -> MaskKind:
        return cls(config.mask_n, config.mask_m)

    @classmethod
    def kept_of(cls, config: PSTConfig) -> int:
        """How many of every mask_m inputs the pattern keeps."""
        if not 1 <= config.mask_n < config.mask_m:
            raise ConfigError(f"pst.mask=nm needs 1 <= mask_n < mask_m, got {config.mask_n}:{config.mask_m}")
        return config.mask_n

    @classmethod
    def check(cls, config: PSTConfig) -> None:
        """The pattern prunes its own share: the schedule must say it, and start dense or there."""
        kept = cls.kept_of(config)
        pattern = 1 - kept / config.mask_m
        if abs(config.final_sparsity - pattern) > 1e-9:
            raise ConfigError(
                f"pst.mask={cls.name} prunes {pattern:g} of the weights ({kept} of every {config.mask_m}): "
                f"set pst.final_sparsity={pattern:g} (got {config.final_sparsity})"
            )
        if config.initial_sparsity not in (0.0, pattern):
            raise ConfigError(
                f"pst.mask={cls.name}: pst.initial_sparsity must be 0 (dense warm-up) or {pattern:g}"
            )

    def kept_per_row(self, cols: int) -> int:
        return cols // self.m * self.n + min(self.n, cols % self.m)

    def pattern_count(self, rows: int, cols: int) -> int:
        """How many entries the whole pattern prunes."""
        return rows * (cols - self.kept_per_row(cols))

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> torch.Tensor:
        full = self.pattern_count(rows, cols)
        if sparsity >= 1 - self.n / self.m - 1e-9:  # the pattern's own share (or more): all of it
            return torch.tensor(full, dtype=torch.long)
        return torch.tensor(min(num_pruned(rows * cols, sparsity), full), dtype=torch.long)

    def _select(self, scores: torch.Tensor, pruned: torch.Tensor) -> Selection:
        pattern = self._pattern(scores)
        if int(pruned) >= self.pattern_count(*scores.shape):
            return pattern
        return Selection(keep_into_pattern, (pattern, int(pruned)), fusable=False)

    def _pattern(self, scores: torch.Tensor) -> Selection:
        return Selection(keep_n_of_m, (self.n, self.m))

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
        if not bool(pruned.any()) or int(pruned) < self.pattern_count(*keep.shape):  # dense, or ramping in
            return super().pattern_problem(keep, pruned)
        return self._group_problem(keep, self.n, f"(not {self.n} of {self.m})") or super().pattern_problem(
            keep, pruned
        )


class VNM(NM):
    """V:2:M: 4 chosen columns of every M per block of V rows, then 2:4 among them per row."""

    name = "vnm"
    obs_prunable = False  # SparseGPT's sweep chooses per row; V:N:M's columns are per block

    def __init__(self, v: int = 64, m: int = 5) -> None:
        super().__init__(n=2, m=m)
        self.v = v

    @classmethod
    def from_config(cls, config: PSTConfig) -> MaskKind:
        return cls(config.mask_v, config.mask_m)

    @classmethod
    def kept_of(cls, config: PSTConfig) -> int:
        if config.mask_m < 4 or config.mask_v < 1:
            raise ConfigError(
                f"pst.mask=vnm needs mask_m >= 4 and mask_v >= 1, got {config.mask_v}:2:{config.mask_m}"
            )
        return 2

    def _pattern(self, scores: torch.Tensor) -> Selection:
        rows, cols = scores.shape
        pad = (-rows) % self.v  # a shorter last block: zero rows add nothing to the sums
        block_sums = torch.nn.functional.pad(scores.detach(), (0, 0, 0, pad)).view(-1, self.v, cols).sum(1)
        columns = keep_n_of_m(block_sums, 4, self.m)
        return Selection(keep_vnm, (columns, self.v, self.m))

    def describe(self) -> dict:
        return {"kind": self.name, "v": self.v, "n": self.n, "m": self.m}

    def selection_cost(self) -> tuple[float, float]:
        # each block's column sums, once; then 2:4 among the chosen columns
        return 4.0, 24.0

    def pattern_problem(self, keep: torch.Tensor, pruned: torch.Tensor) -> str | None:
        if not bool(pruned.any()) or int(pruned) < self.pattern_count(*keep.shape):
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
    def forward(
        ctx, scores: torch.Tensor, kind: MaskKind, pruned: torch.Tensor, check: bool = True
    ) -> torch.Tensor:
        return kind.select(scores, pruned, check).mask(scores).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad_mask, None, None, None


# Every mask kind by its pst.mask name: one class each, one line here.
MASK_KINDS: dict[str, type[MaskKind]] = {kind.name: kind for kind in (TopK, LearnedThreshold, NM, VNM)}


def mask_kind(config: PSTConfig) -> MaskKind:
    """The mask kind ``config.mask`` names, with its parameters."""
    return MASK_KINDS[config.mask].from_config(config)


def described_kind(described: dict) -> MaskKind:
    """The mask kind an export recorded (``describe()``'s dict), to check its weights against."""
    return MASK_KINDS[described["kind"]].from_description(described)
