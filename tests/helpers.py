"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def half_kept(out_features: int, in_features: int, mask: str) -> torch.Tensor:
    """A random mask keeping half of an (out, in) weight: top-k over random scores, or 2:4 ("nm")
    over groups of 4 along the input."""
    scores = torch.rand(out_features, in_features)
    if mask == "topk":
        return scores > scores.reshape(-1).kthvalue(out_features * in_features // 2).values
    groups = scores.reshape(out_features, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
    return keep.reshape(out_features, in_features)
