"""Mask selection: exact top-k thresholds of importance scores (per matrix or per row), and
the element-wise tests that turn a threshold or a group rank into a mask.

A mask is stored as a ``Threshold`` (one value, and the flat position from which entries
equal to it are kept), never as a weight-sized tensor, so a layer can recompute it in
backward from the scores. Entries above the value are kept, entries below it pruned; ties
at the value are broken by flat index, lower index pruned first (fp32 scores of a large
matrix do tie: 45M entries share far fewer distinct values near the median). The mask is
therefore a deterministic function of the scores: every rank holding the same scores gets
the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.workspace import WORKSPACE

# Above this many entries, selection brackets the k-th value from a fixed random sample and
# finishes on the few entries inside the bracket; below it, kthvalue on everything is as fast.
_BRACKET_MIN_NUMEL = 1 << 18
_sample_index_cache: dict[tuple[int, str], torch.Tensor] = {}


class NonFiniteScoresError(ValueError):
    """Importance scores hold NaN or infinite values: no top-k of them means anything."""


def check_finite(flat: torch.Tensor) -> None:
    """Raise NonFiniteScoresError if ``flat`` holds NaN or inf.

    A sum is one cheap pass (a bool ``isfinite`` pass costs more than the whole selection) and
    is non-finite whenever an entry is; only then are the entries counted, so an overflowing
    sum of finite scores raises nothing.
    """
    if torch.isfinite(flat.sum()):
        return
    nan, finite = int(torch.isnan(flat).sum()), int(torch.isfinite(flat).sum())
    if finite < flat.numel():
        raise NonFiniteScoresError(
            f"{nan:,} NaN and {flat.numel() - finite - nan:,} infinite values among {flat.numel():,} "
            "importance scores"
        )


@dataclass(frozen=True)
class Threshold:
    value: torch.Tensor  # 0-dim (or (out, 1), one per row), the scores' dtype and device
    # Entries equal to ``value`` are kept from this flat index on (numel: none); per row, a column.
    first_kept_tie: int | torch.Tensor


def num_pruned(numel: int, sparsity: float) -> int:
    """How many entries a matrix of ``numel`` entries loses at ``sparsity`` (the release's rule)."""
    return int(numel * sparsity)


def _sample_size(numel: int) -> int:
    """Sample size m that about minimises the work: two selections on m entries plus one on
    the bracket, whose width falls as 1/sqrt(m): m ~ (1.5 numel)^(2/3), within [4096, 2^17]."""
    return min(max(int((1.5 * numel) ** (2 / 3)), 1 << 12), 1 << 17)


def _sample_index(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, str(device))
    if key not in _sample_index_cache:  # fixed seed: the same sample on every rank and step
        generator = torch.Generator().manual_seed(numel)
        index = torch.randint(0, numel, (_sample_size(numel),), generator=generator)
        _sample_index_cache[key] = index.to(device)
    return _sample_index_cache[key]


def ascending_positions(flags: torch.Tensor) -> torch.Tensor:
    """``torch.nonzero`` of a flat bool tensor with few True entries, ascending: read eight flags
    at a time (as one int64 word), then only the words that hold one. torch's CPU nonzero scans
    one byte at a time on one thread, which took 40 ms at a 7B layer's 45M entries."""
    try:
        words = flags.view(torch.int64)
    except RuntimeError:  # a length or an offset not a multiple of 8
        return torch.nonzero(flags).reshape(-1)
    hit = torch.nonzero(words).reshape(-1)
    within = torch.nonzero(flags.view(-1, 8)[hit])  # (word, flag) pairs, ascending
    return hit[within[:, 0]] * 8 + within[:, 1]


def _bracketed_kth(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int, torch.Tensor] | None:
    """(k-th smallest, #entries below it, flat indices of the entries equal to it, ascending),
    or None if the bracket missed."""
    n = flat.numel()
    sample = flat[_sample_index(n, flat.device)]
    m = sample.numel()
    # The sample's quantile has a standard error of sqrt(p(1-p)/m) in rank; 6 of them is ample.
    centre = k / n * m
    half = 6.0 * (k / n * (1 - k / n) * m) ** 0.5 + 2
    lo = sample.kthvalue(max(int(centre - half), 1)).values
    hi = sample.kthvalue(min(int(centre + half) + 1, m)).values
    # Whole-tensor passes (a loop over cache-sized chunks was slower: many small parallel ops),
    # into reused scratch: fresh weight-sized bool buffers cost more in page faults than the compares.
    in_bracket = torch.ge(flat, lo, out=WORKSPACE.take("bracket", flat.shape, torch.bool, flat.device))
    below = n - int(torch.count_nonzero(in_bracket))
    in_bracket.logical_and_(
        torch.le(flat, hi, out=WORKSPACE.take("up_to_hi", flat.shape, torch.bool, flat.device))
    )
    where = ascending_positions(in_bracket)
    inside = flat[where]
    rank = k - below
    if not 1 <= rank <= inside.numel():
        return None
    value = inside.kthvalue(rank).values
    return value, below + int(torch.count_nonzero(inside < value)), where[inside == value]


def select_pruned(scores: torch.Tensor, k: int) -> Threshold:
    """The threshold that prunes exactly the ``k`` entries with the smallest scores.

    Found by selection, not a sort: on large matrices a few passes over the scores bracket the
    k-th value (from a fixed sample) and kthvalue runs on the bracket only. Raises
    NonFiniteScoresError on NaN or infinite scores.
    """
    flat = scores.detach().reshape(-1)
    check_finite(flat)  # NaN would break the selection's counting (and means training diverged)
    n = flat.numel()
    if k == 0:
        return Threshold(torch.tensor(float("-inf"), dtype=flat.dtype, device=flat.device), n)
    found = _bracketed_kth(flat, k) if n >= _BRACKET_MIN_NUMEL else None
    if found is None:
        value = flat.kthvalue(k).values
        found = value, int(torch.count_nonzero(flat < value)), torch.nonzero(flat == value).reshape(-1)
    value, below, tied = found
    ties_to_prune = k - below
    if ties_to_prune == tied.numel():
        return Threshold(value, n)
    # Only some ties go: the first ``ties_to_prune`` in flat order; the rest are kept.
    return Threshold(value, int(tied[ties_to_prune]))


def keep_from(scores: torch.Tensor, value: torch.Tensor, first_kept_tie: int) -> torch.Tensor:
    """Bool mask of the entries above ``value``, and of those equal to it from ``first_kept_tie`` on.

    Written so that ``torch.compile`` fuses it into the pass around it: the flat position is
    an index expression there, not a tensor.
    """
    keep = scores > value
    if first_kept_tie >= scores.numel():
        return keep
    if torch.compiler.is_compiling():  # fused: no position tensor is ever written
        position = torch.arange(scores.numel(), device=scores.device).view(scores.shape)
        return keep | ((scores == value) & (position >= first_kept_tie))
    ties = scores == value
    ties.view(-1)[:first_kept_tie] = False
    return keep | ties


def select_row_thresholds(scores: torch.Tensor, pruned: torch.Tensor, check: bool = True) -> Threshold:
    """Per-row thresholds that prune exactly ``pruned[r]`` entries of row r (smallest scores,
    ties pruned lowest column first): ``value`` (out, 1) and ``first_kept_tie`` (out, 1), a column.
    ``pruned`` is read on the host (one count for all rows, or one per row)."""
    scores = scores.detach()
    if check:
        check_finite(scores.reshape(-1))
    rows, cols = scores.shape
    pruned = pruned.to(dtype=torch.long).expand(rows)
    uniform, first = bool((pruned == pruned[0]).all()), int(pruned[0])  # on the host: no device sync
    pruned = pruned.to(scores.device)
    if uniform:  # one count for all rows: kthvalue, no sort
        value = scores.kthvalue(max(first, 1), dim=1, keepdim=True).values
    else:
        ordered = scores.sort(dim=1).values
        value = ordered.gather(1, (pruned - 1).clamp(min=0)[:, None])
    value = torch.where(pruned[:, None] > 0, value, torch.full_like(value, float("-inf")))
    ties_to_prune = pruned[:, None] - torch.count_nonzero(scores < value, dim=1)[:, None]
    tied = torch.count_nonzero(scores == value, dim=1)[:, None]
    column = torch.full_like(pruned[:, None], cols)  # every tie pruned: none kept
    # Only rows that keep some of their ties and prune others need the ties' order (a host sync,
    # then work on those rows alone: a cumsum over the whole matrix cost half the selection).
    split = torch.nonzero((ties_to_prune < tied).reshape(-1)).reshape(-1)
    if split.numel():
        ties = scores[split] == value[split]
        kept_ties = ties & (ties.cumsum(1) > ties_to_prune[split])
        column[split] = kept_ties.int().argmax(1, keepdim=True)
    return Threshold(value, column)


def keep_rows(scores: torch.Tensor, value: torch.Tensor, first_kept_tie: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries above their row's ``value``, and of those equal to it from the
    row's column ``first_kept_tie`` on (element-wise: fuses like ``keep_from``)."""
    column = torch.arange(scores.shape[1], device=scores.device)
    return (scores > value) | ((scores == value) & (column >= first_kept_tie))


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest scores of every ``m`` consecutive entries of a row.

    Ties keep the later position (lower positions are pruned first, as in ``select_pruned``).
    A last group narrower than ``m`` keeps its ``n`` largest. Each entry's rank is counted
    against the ``m`` entries of its group: element-wise work that ``torch.compile`` fuses.
    """
    if torch.compiler.is_compiling():
        return _keep_n_of_m_indexed(scores, n, m)
    rows, cols = scores.shape
    pad = (-cols) % m
    if pad:  # a narrower last group: padding that always loses
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    groups = scores.view(rows, -1, m)
    position = torch.arange(m, device=scores.device)
    beaten_by = torch.zeros(groups.shape, dtype=torch.int32, device=scores.device)
    for j in range(m):
        other = groups[..., j : j + 1]
        beaten_by += (other > groups) | ((other == groups) & (j > position))
    return (beaten_by < n).view(rows, -1)[:, :cols]


def _keep_n_of_m_indexed(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``keep_n_of_m`` as the fused pass takes it: each entry reads its group's m entries by
    column index, with no padded copy or grouped view (inductor's CPU code for those took 4x
    to 10x longer at 11008 x 4096; the comparisons, so the mask, are the same)."""
    cols = scores.shape[1]
    column = torch.arange(cols, device=scores.device)
    position = column % m
    beaten_by = torch.zeros_like(scores, dtype=torch.int32)
    for j in range(m):
        other_column = column - position + j
        other = scores[:, other_column.clamp(max=cols - 1)]
        beats = (other > scores) | ((other == scores) & (j > position))
        beaten_by = beaten_by + (beats & (other_column < cols)).to(torch.int32)
    return beaten_by < n
