"""Each baseline layer against its own reference formula, with its exact sparsity."""

import pytest
import torch
from conftest import pst_method
from torch import nn
from transformers.pytorch_utils import Conv1D

from pst_ds import PSTConfig
from pst_ds.config import ConfigError, LoRAConfig
from pst_ds.experiment import experiment_config
from pst_ds.layers.baselines import LoRALinear, MagnitudeLinear, MovementLinear
from pst_ds.layers.inject import head_parameters, inject_pst, iter_pst_layers
from pst_ds.methods.random import RandomMaskLinear
from pst_ds.train.schedule import SparsityController


def argsort_mask(scores, sparsity):
    """Reference mask: a stable full sort, the k smallest pruned."""
    k = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel())
    keep[scores.reshape(-1).argsort(stable=True)[:k]] = 0
    return keep.reshape(scores.shape)


def base_layer(kind, out_f=24, in_f=40):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f) if kind == "linear" else Conv1D(out_f, in_f)


def oriented(base):
    return base.weight.detach().T if isinstance(base, Conv1D) else base.weight.detach()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_magnitude_masks_smallest_weights_and_trains_kept_ones(kind):
    base = base_layer(kind)
    layer = MagnitudeLinear(base, PSTConfig.release())
    layer.sparsity = 0.6
    x, g = torch.randn(5, 40), torch.randn(5, 24)
    W = oriented(base).clone()
    M = argsort_mask(W.abs(), 0.6)

    (layer(x) * g).sum().backward()

    torch.testing.assert_close(layer(x), x @ (M * W).T + base.bias.detach(), rtol=1e-5, atol=1e-5)
    grad = base.weight.grad
    expected = M * (g.T @ x)  # dL/dW = G * M: pruned weights get no gradient
    torch.testing.assert_close(grad.T if kind == "conv1d" else grad, expected, rtol=1e-5, atol=1e-5)
    assert (~layer.mask()).sum() == int(W.numel() * 0.6)
    assert (layer.merged_weight() == 0).sum() >= int(W.numel() * 0.6)


@pytest.mark.parametrize("train_weight", [True, False], ids=["movement", "smp"])
def test_movement_scores_get_straight_through_gradient(train_weight):
    base = base_layer("linear")
    layer = MovementLinear(base, PSTConfig.release(), train_weight=train_weight)
    with torch.no_grad():
        layer.scores.normal_()
    layer.sparsity = 0.7
    x, g = torch.randn(5, 40), torch.randn(5, 24)
    W = base.weight.detach().clone()
    M = argsort_mask(layer.scores.detach(), 0.7)

    (layer(x) * g).sum().backward()

    G = g.T @ x
    torch.testing.assert_close(layer(x), x @ (M * W).T + base.bias.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.scores.grad, G * W, rtol=1e-5, atol=1e-5)  # dS = G * W
    if train_weight:
        torch.testing.assert_close(base.weight.grad, G * M, rtol=1e-5, atol=1e-5)
    else:
        assert base.weight.grad is None and not base.weight.requires_grad
    assert (~layer.mask()).sum() == int(W.numel() * 0.7)


def test_smp_leaves_the_weights_bit_identical_after_optimizer_steps():
    base = base_layer("linear")
    base.bias.requires_grad_(False)  # frozen by the injector in a real run
    before = base.weight.detach().clone()
    layer = MovementLinear(base, PSTConfig.release(), train_weight=False)
    layer.sparsity = 0.5
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(layer.scores)]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        layer(torch.randn(4, 40)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(base.weight, before)
    assert layer.scores.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_matches_reference_and_merges(kind):
    base = base_layer(kind)
    layer = LoRALinear(base, LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(5, 40), torch.randn(5, 24)
    W, A, B = oriented(base), layer.lora_A.detach(), layer.lora_B.detach()

    (layer(x) * g).sum().backward()

    y_ref = x @ W.T + base.bias.detach() + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, 2.0 * g.T @ (x @ A.T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, 2.0 * (g @ B).T @ x, rtol=1e-5, atol=1e-5)
    merged = layer.merged_weight()
    expected = W + 2.0 * B @ A
    torch.testing.assert_close(merged, expected.T if kind == "conv1d" else expected)


@pytest.mark.parametrize(
    "method, trainable_in_layer",
    [
        ("pst", {"U", "V", "A", "B", "R", "C"}),
        ("magnitude", {"weight"}),
        ("movement", {"weight", "scores"}),
        ("smp", {"scores"}),
        ("lora", {"lora_A", "lora_B"}),
    ],
)
def test_each_method_trains_only_its_own_parameters(method, trainable_in_layer, tiny_model):
    model = tiny_model("tiny_llama")
    names = inject_pst(model, PSTConfig.release(trainable_modules=["lm_head"]), method, LoRAConfig())
    assert len(names) == 14  # q, k, v, o, gate, up, down in each of the 2 blocks
    layer = model.get_submodule(names[0])
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == trainable_in_layer
    heads = {id(p) for p in head_parameters(model, PSTConfig.release(trainable_modules=["lm_head"]))}
    outside = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in heads and not any(n.startswith(t + ".") for t in names)
    ]
    assert outside == []
    assert (len(dict(iter_pst_layers(model))) == 14) == (method != "lora")


def test_dense_trains_everything_and_unknown_method_is_refused(tiny_model):
    model = tiny_model("tiny_llama")
    inject_pst(model, PSTConfig.release(), "dense")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="method must be one of"):
        experiment_config(method="obc")


def test_random_mask_is_exact_seeded_and_blind_to_the_weights():
    base = base_layer("linear", out_f=64, in_f=80)
    layers = [RandomMaskLinear(base, PSTConfig.release(), seed=seed) for seed in (1, 1, 2)]
    for layer in layers:
        layer.sparsity = 0.5
    mask = layers[0].mask()
    noise = torch.rand(64, 80, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, argsort_mask(noise, 0.5).bool())  # top-k of the seeded noise
    assert torch.equal(mask, layers[1].mask()) and not torch.equal(mask, layers[2].mask())
    agreement = (mask == argsort_mask(oriented(base).abs(), 0.5).bool()).float().mean()
    assert 0.4 < agreement < 0.6  # about half, as chance gives: not magnitude pruning's mask
    x = torch.randn(3, 80)
    expected = x @ (mask * oriented(base)).T + base.bias.detach()
    torch.testing.assert_close(layers[0](x), expected, rtol=1e-5, atol=1e-5)


def test_random_baseline_trains_nothing_and_holds_the_final_sparsity(tiny_model):
    model = tiny_model("tiny_llama")
    config = PSTConfig.release(final_sparsity=0.6)
    method = pst_method(config, "random")
    names = inject_pst(model, config, "random")
    layers = dict(iter_pst_layers(model))
    assert not method.trains and set(layers) == set(names)
    controller = SparsityController(method, 0, layers)
    controller.apply(0)
    for name, layer in layers.items():
        assert int((~layer.mask()).sum()) == int(layer.out_features * layer.in_features * 0.6), name
    assert controller.global_sparsity() == pytest.approx(0.6, abs=1e-4)
