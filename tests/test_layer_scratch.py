"""What a PST layer keeps between forward and backward, and the scratch it reuses: the forward's mask
packed to bits (pst.saved_mask=bits) gives exactly what selecting again from S gives (recompute),
at out*in/8 bytes; the shared workspace never hands one layer's buffer to another's live pass."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pst_ds import PSTConfig, PSTLinear
from pst_ds.layers.workspace import WORKSPACE
from pst_ds.masks.bits import pack_bits, pack_rows, unpacked_groups

KINDS = {
    "topk": {},
    "row": {"mask_scope": "row"},
    "nm": {"mask": "nm", "final_sparsity": 0.5},
    "vnm": {"mask": "vnm", "mask_v": 8, "mask_m": 5, "final_sparsity": 0.6},
    "activation": {"importance": "activation"},
}


def pst_layer(base: nn.Module, saved_mask: str, compiled: bool, **knobs) -> PSTLinear:
    torch.manual_seed(0)
    layer = PSTLinear(
        base, PSTConfig.release(weight_rank=4, mask_rank=4, compile=compiled, saved_mask=saved_mask, **knobs)
    )
    layer.sparsity = 0.6 if knobs.get("mask") == "vnm" else 0.5
    with torch.no_grad():
        for name in ("V", "B", "R", "C"):
            getattr(layer, name).normal_(0, 0.05)
        if layer.input_stats is not None:
            layer.input_sq.copy_(torch.rand(layer.in_features) * 2)
    return layer


def output_and_grads(layer: PSTLinear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "x": x.grad, **grads}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_bits_give_the_gradients_of_selecting_again(kind, conv1d, compiled):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 80)
    results = {}
    for saved_mask in ("bits", "recompute"):
        torch.manual_seed(2)
        base = Conv1D(96, 80) if conv1d else nn.Linear(80, 96)
        results[saved_mask] = output_and_grads(
            pst_layer(base.requires_grad_(False), saved_mask, compiled, **KINDS[kind]), x
        )
    bits, recompute = results["bits"], results["recompute"]
    assert bits.keys() == recompute.keys() and {"U", "V", "A", "B", "R", "C", "x"} <= bits.keys()
    for name, value in bits.items():  # W' is recomputed by another kernel: the last bit may differ
        torch.testing.assert_close(value, recompute[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "saved_mask, compiled, kept", [("bits", True, 96 * 80 // 8), ("recompute", True, 0), ("bits", False, 0)]
)
def test_bits_are_all_that_is_kept_beside_the_input(saved_mask, compiled, kept):
    layer = pst_layer(nn.Linear(80, 96).requires_grad_(False), saved_mask, compiled=compiled)
    x = torch.randn(7, 80)
    params = {p.data_ptr() for p in layer.parameters()}
    seen = []

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            seen.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sum(seen) == kept


def test_rows_not_a_multiple_of_eight_inputs_select_again():
    torch.manual_seed(2)
    layer = pst_layer(nn.Linear(78, 40).requires_grad_(False), "bits", compiled=True)
    torch.manual_seed(2)
    reference = pst_layer(nn.Linear(78, 40).requires_grad_(False), "recompute", compiled=True)
    x = torch.randn(4, 78)
    expected = output_and_grads(reference, x)
    for name, value in output_and_grads(layer, x).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_packed_rows_round_trip_and_match_flat_packing():
    flags = torch.rand(6, 32) > 0.5
    packed = pack_rows(flags)
    assert packed.shape == (6, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpacked_groups(packed).view(6, 32), flags)
    assert torch.equal(packed.reshape(-1), pack_bits(flags))  # rows of whole bytes: the same bytes


def test_layers_of_other_shapes_between_forward_and_backward_leave_the_gradients_alone():
    """Two layers' passes interleave as in a model (forward A, forward B, backward B, backward A):
    the gradients are those of each layer run alone, and the workspace only grows to the larger."""
    WORKSPACE.clear()
    small = pst_layer(nn.Linear(48, 64).requires_grad_(False), "recompute", compiled=True)
    large = pst_layer(nn.Linear(64, 112).requires_grad_(False), "recompute", compiled=True)
    x = torch.randn(5, 48)
    alone_large = output_and_grads(large, output_and_grads(small, x)["y"])
    # The small layer alone, under the gradient the large one sends back to it in the model.
    small.zero_grad(set_to_none=True)
    alone_x = x.clone().requires_grad_(True)
    (small(alone_x) * alone_large["x"]).sum().backward()
    alone_small = {n: p.grad.clone() for n, p in small.named_parameters() if p.grad is not None}
    alone_small["x"] = alone_x.grad
    for layer in (small, large):
        layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = large(small(x))
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    for name in ("U", "V", "A", "B", "R", "C"):
        torch.testing.assert_close(getattr(large, name).grad, alone_large[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(getattr(small, name).grad, alone_small[name], rtol=1e-6, atol=1e-7)
        assert alone_small[name].abs().sum() > 0
    torch.testing.assert_close(x.grad, alone_small["x"], rtol=1e-6, atol=1e-7)
    held = WORKSPACE.nbytes()
    y = large(small(x))
    y.sum().backward()
    assert WORKSPACE.nbytes() == held <= 6 * 112 * 64 * 4  # the largest layer's scratch, reused
