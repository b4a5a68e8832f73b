"""``pst.init=zeros``: start from a model that is already sparse (pruned by llm-compressor, Wanda,
MaskLLM or pst-ds itself). Each layer's mask state is the count of its weight's zeros, in its
mask kind's groups, so S = |W| selects exactly those zeros at the first step. Read again from
the weights whenever a run is built (a resumed one too): they are frozen, so the count is too.
"""

from __future__ import annotations

import deepspeed
import torch

from ..config import ConfigError
from ..layers.base import SparseLinear


def zero_counts(layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor]:
    """Each layer's mask state that prunes exactly its weight's zeros (collective under ZeRO-3: one
    layer's whole weight gathered at a time). A layer whose nonzeros its kind's mask would not all
    keep (zeros outside an N:M pattern), or a model with no zero at all, is a ConfigError."""
    counts, zeros_seen = {}, 0
    for name, layer in layers.items():
        with deepspeed.zero.GatheredParameters([layer.weight]), torch.no_grad():
            weight = layer.oriented_weight().detach()
            kept = weight != 0
            kind = layer.mask_kind
            if kind.grouped:  # the whole pattern: its zeros must hold every entry it prunes
                count = kind.pruned_count(*weight.shape, 1.0)
            elif kind.per_row:
                count = (~kept).sum(1).long().cpu()
            else:
                count = (~kept).sum().long().cpu()
            zeros_seen += int((~kept).sum())
            scores = weight.float().abs()
            keep = kind.select(scores, count.cpu()).mask(scores)
            lost = int((kept & ~keep).sum())
        if lost:
            raise ConfigError(
                f"pst.init=zeros: the zeros of {name} are not a {kind.name} mask ({lost:,} nonzero weights "
                f"would be pruned); set pst.mask to the pattern the model was pruned with"
            )
        counts[name] = count
    if zeros_seen == 0:
        raise ConfigError(
            f"pst.init=zeros reads the mask from the model's zero weights, but none of its {len(layers)} "
            "targeted layers has a zero: the model is not sparse (prune it with pst.init=auto, wanda or "
            "sparsegpt)"
        )
    return counts
