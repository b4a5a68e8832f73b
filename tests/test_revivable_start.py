"""A start that rewrites W (SparseGPT's), held by PST as a decaying prior on S: the first mask is
the start's exactly, W keeps its original values where the start prunes, and a pruned weight
whose score grows once the prior has decayed comes back with its original value."""

import pytest
import torch
from helpers import half_kept
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
    keep = half_kept(out_f, in_f, mask)
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


@pytest.mark.parametrize("final_sparsity", [0.5, 0.7])
def test_pst_from_sparsegpt_starts_on_its_mask_and_keeps_the_pruned_weights(tiny_model, final_sparsity):
    """PST with pst.init=sparsegpt on a tiny Llama: every layer's first mask is SparseGPT's own
    (the same sweep with the start bias off, which writes its zeros into W), W holds SparseGPT's
    values where it keeps and the original ones where it prunes, and the bias decays to 0 over
    pst.start_bias_decay of the run (its share of 10 steps here)."""
    from test_oneshot import calibration, experiment, injected, one_shot

    from pst_ds.methods import method_class
    from pst_ds.train.schedule import SparsityController

    results = {}
    for decay in (0.0, 0.3):
        config = experiment("pst", init="sparsegpt", final_sparsity=final_sparsity, start_bias_decay=decay)
        model, reference, layers = injected(tiny_model, config)
        assert all(layer.revivable == (decay > 0) for layer in layers.values())
        one_shot("sparsegpt", model, layers, calibration(), final_sparsity, block_columns=16)
        controller = SparsityController(method_class("pst")(config), 10, layers)
        masks = {name: layer.mask() for name, layer in layers.items()}
        weights = {name: layer.oriented_weight().detach().clone() for name, layer in layers.items()}
        originals = {name: reference.get_submodule(name).weight.detach() for name in layers}
        results[decay] = masks, weights, originals, controller, layers
    zeros_masks, zeros_weights, originals, _, _ = results[0.0]
    masks, weights, _, controller, layers = results[0.3]
    for name in layers:
        keep = zeros_weights[name] != 0
        assert torch.equal(zeros_masks[name], keep), name  # the old start: W's zeros are the mask
        assert torch.equal(masks[name], keep), name  # the revivable one: the same mask, exactly
        torch.testing.assert_close(weights[name], torch.where(keep, zeros_weights[name], originals[name]))
    layer = next(iter(layers.values()))
    full = float(layer.start_bias_full)
    for step, strength in ((0, 1.0), (1, 1 - 1 / 3), (2, 1 - 2 / 3), (3, 0.0), (7, 0.0)):
        controller.apply(step)
        assert float(layer.start_bias) == pytest.approx(full * strength), step


@pytest.mark.slow
@pytest.mark.distributed
def test_pst_from_sparsegpt_moves_its_mask_and_exports_the_pattern_on_two_zero3_ranks(tmp_path, small_text):
    """PST from SparseGPT's 2:4 start, LoRA's update, on two ZeRO-3 ranks (the backbone sharded):
    the mask moves once the start's bias decays, and the export passes the 2:4 check."""
    import json

    from test_distributed import read_metrics
    from test_masked_lora import launch_two_zero3_ranks

    run = tmp_path / "run"
    launch_two_zero3_ranks(
        tmp_path, run, [f"data.train_files=[{small_text}]", "method=pst", "pst.init=sparsegpt", "pst.mask=nm",
                        "pst.final_sparsity=0.5", "pst.update=lora", "pst.start_bias_decay=0.5"],
    )  # fmt: skip
    steps, _ = read_metrics(run)
    changed = [r["mask_changed"] for r in steps if "mask_changed" in r]
    assert len(changed) == 3 and max(changed) > 0
    report = json.loads((run / "export" / "pst_sparsity.json").read_text())
    for name, layer in report["layers"].items():
        assert layer["pattern_verified"] and layer["sparsity"] == 0.5, name
