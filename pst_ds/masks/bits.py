"""Bool masks packed eight entries to a byte, and back: 1/32 of an fp32 weight's bytes."""

from __future__ import annotations

import torch


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes of its flat entries, eight each (the last byte zero-padded)."""
    flat = flags.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return _packed_groups(flat.view(-1, 8))


def pack_rows(flags: torch.Tensor) -> torch.Tensor:
    """A bool (rows, cols) mask as (rows, cols / 8) bytes, each row's own (cols a multiple of 8).

    Groups of eight along the contiguous dimension: ``torch.compile`` fuses it into the pass that
    makes the mask, with no index arithmetic."""
    rows, cols = flags.shape
    return _packed_groups(flags.reshape(rows, cols // 8, 8))


def _packed_groups(groups: torch.Tensor) -> torch.Tensor:
    # Eight shifted int32 terms: inductor's CPU code for a uint8 sum over the group, or a product
    # with the bit values, took 4x to 70x longer (11008 x 4096 mask, docs/archive/results-history.md).
    groups = groups.to(torch.int32)
    return sum(groups[..., j] << j for j in range(8)).to(torch.uint8)


def unpacked_groups(packed: torch.Tensor) -> torch.Tensor:
    """``pack_rows``'s bytes back as bool groups, (rows, cols / 8, 8)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 1).bool()
