"""pst.low_precision_forward: in bf16 the forward multiplies by M * W' split into its rounding and
the remainder, so an update far below bf16's resolution (0.1% of |W| here) reaches the output as
in an exact product; rounded alone, most of it is lost. In fp32 both are the same."""

import pytest
import torch
from torch import nn

from pst_ds import PSTConfig, PSTLinear


def layer_and_input(mode: str, compiled: bool, dtype: torch.dtype) -> tuple[PSTLinear, torch.Tensor]:
    torch.manual_seed(0)
    config = PSTConfig.release(compile=compiled, low_precision_forward=mode, weight_rank=4, mask_rank=4)
    layer = PSTLinear(nn.Linear(256, 128).requires_grad_(False), config)
    layer.sparsity = 0.5
    with torch.no_grad():
        layer.U.normal_(0, 1)
        layer.V.normal_(0, 1)
        layer.to(dtype)
        update = (layer.U.float() @ layer.V.float()).abs().mean()
        layer.V.mul_(0.001 * layer.weight.float().abs().mean() / update)  # beta U V: 0.1% of |W|
    return layer.train(), torch.randn(64, 256).to(dtype)


def update_reaching_output(layer: PSTLinear, x: torch.Tensor) -> float:
    """The share of the exact product's update effect, x (M * (W' - W))^T, that the output carries."""
    scores, updated = layer.scores_and_weight()
    keep = layer.selection(scores).mask(scores).double()
    exact = x.double() @ (updated.double() * keep).t()
    without = x.double() @ (layer.weight.double() * keep).t()
    got = layer(x).double() - layer.bias.double()
    effect = exact - without
    return float(((got - without) * effect).sum() / effect.pow(2).sum())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_small_update_reaches_a_bf16_output_only_when_split(compiled):
    split = update_reaching_output(*layer_and_input("split", compiled, torch.bfloat16))
    rounded = update_reaching_output(*layer_and_input("rounded", compiled, torch.bfloat16))
    assert split == pytest.approx(1.0, abs=0.05)
    assert rounded < 0.5


def test_fp32_is_the_same_either_way():
    split, x = layer_and_input("split", False, torch.float32)
    rounded, _ = layer_and_input("rounded", False, torch.float32)
    assert torch.equal(split(x), rounded(x))
