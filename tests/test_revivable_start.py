"""A start that rewrites W (SparseGPT's), held by PST as a decaying prior on S: the first mask is
the start's exactly, W keeps its original values where the start prunes, and a pruned weight
whose score grows once the prior has decayed comes back with its original value."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pst_ds.config import PSTConfig
from pst_ds.layers.pst import PSTLinear


@pytest.mark.parametrize("mask", ["topk", "nm"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_the_first_mask_is_the_start_s_and_a_revived_weight_is_the_original(mask, base_kind):
    torch.manual_seed(0)
    out_f, in_f = 16, 24
    base = (nn.Linear(in_f, out_f) if base_kind == "linear" else Conv1D(out_f, in_f)).requires_grad_(False)
    config = PSTConfig(mask=mask, final_sparsity=0.5, importance="magnitude", init="magnitude")
    layer = PSTLinear(base, config, revivable=True)
    layer.sparsity = 0.5
    original = layer.oriented_weight().detach().clone()
    # A start's mask unlike magnitude's (random scores), its kept values changed, zeros elsewhere.
    scores = torch.rand(out_f, in_f)
    if mask == "topk":
        keep = scores > scores.reshape(-1).kthvalue(out_f * in_f // 2).values
    else:
        groups = scores.reshape(out_f, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
        keep = keep.reshape(out_f, in_f)
    start = torch.where(keep, original * 1.5 + 0.01, torch.zeros_like(original))
    layer.hold_start(start)

    torch.testing.assert_close(layer.oriented_weight(), torch.where(keep, start, original))
    assert torch.equal(layer.mask(), keep)  # exactly the start's, though |W| would pick another
    masked, _ = layer.masked_weight_and_mask()
    torch.testing.assert_close(masked, layer.to_base_layout(start))  # what the start exports

    # The prior decayed, a pruned weight's score lifted above every other by the update: it comes
    # back, with its original value (plus the update, the only thing that moved it).
    layer.put_start_strength(0.0)
    row, col = (~keep).nonzero()[0].tolist()
    with torch.no_grad():
        layer.U.zero_()
        layer.V.zero_()
        layer.U[row, 0] = 1.0
        layer.V[0, col] = 100.0 / layer.hyper.beta
    revived = layer.mask()
    assert revived[row, col] and int(revived.sum()) == int(keep.sum())
    masked, _ = layer.masked_weight_and_mask()
    oriented = masked.t() if base_kind == "conv1d" else masked
    torch.testing.assert_close(oriented[row, col], original[row, col] + 100.0)
