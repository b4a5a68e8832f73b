"""OWL's layer sparsities: the paper's formula, its outlier share, and the run that uses them."""

import pytest
import torch
from conftest import pst_method
from test_oneshot import calibration, experiment, injected, ref_wanda_mask

from pst_ds.config import ConfigError
from pst_ds.experiment import experiment_from_dict
from pst_ds.methods import Calibration
from pst_ds.oneshot.calibrate import block_of
from pst_ds.oneshot.owl import outlier_share, owl_sparsities
from pst_ds.train.schedule import SparsityController


def test_block_sparsities_spread_by_lambda_around_the_target():
    # shares 1, 2, 3 % -> scaled 0, .08, .16 -> keep .22, .30, .38 of the weights
    assert owl_sparsities([1.0, 2.0, 3.0], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62])
    assert owl_sparsities([4.0, 4.0], 0.5, 0.08) == pytest.approx([0.5, 0.5])  # no spread: uniform
    assert owl_sparsities([0.0, 10.0], 0.5, 0.0) == pytest.approx([0.5, 0.5])


def test_outlier_share_counts_scores_above_m_times_the_blocks_mean():
    w1 = torch.tensor([[1.0, -1.0], [1.0, 10.0]])  # norms 1, 2 -> scores 1 2 1 20
    w2 = torch.tensor([[0.5, 0.5, 0.5, 0.5]])  # norms 2 -> scores 1 1 1 1
    # mean of all 8 scores: 28 / 8 = 3.5; above 2 x 3.5 = 7: one score (20)
    share = outlier_share([w1, w2], [torch.tensor([1.0, 2.0]), torch.full((4,), 2.0)], m=2.0)
    assert share == pytest.approx(100 / 8)


def test_owl_wanda_prunes_each_block_at_its_own_sparsity_from_the_dense_outliers(tiny_model):
    config = experiment("wanda", final_sparsity=0.6, sparsity_profile="owl", owl_m=3.0, owl_lmbda=0.1)
    model, reference, layers = injected(tiny_model, config)
    controller = SparsityController(pst_method(config.pst, "wanda"), 0, layers)
    batches = calibration()
    run = Calibration(model, layers, batches, lambda b: model(**b), 0.6, controller.put_in_force)
    with torch.no_grad():
        controller.warm_start(run)

    # Independent reference: the dense model's inputs, the outlier share per block, the formula.
    seen = {name: [] for name in layers}
    hooks = [
        reference.get_submodule(n).register_forward_pre_hook(lambda _m, a, s=seen[n]: s.append(a[0]))
        for n in layers
    ]
    with torch.no_grad():
        for batch in batches:
            reference(**batch)
    for hook in hooks:
        hook.remove()
    norms = {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).pow(2).mean(0) for n, xs in seen.items()}
    blocks = list(dict.fromkeys(block_of(n) for n in layers))
    shares = []
    for block in blocks:
        scores = torch.cat(
            [
                (reference.get_submodule(n).weight.abs() * norms[n].sqrt()).reshape(-1)
                for n in layers
                if block_of(n) == block
            ]
        )
        shares.append(100 * float((scores > 3.0 * scores.mean()).float().mean()))
    expected = dict(zip(blocks, owl_sparsities(shares, 0.6, 0.1), strict=True))
    assert len(set(round(s, 6) for s in expected.values())) > 1  # the blocks differ

    for name, layer in layers.items():
        assert controller.profile[name] == pytest.approx(expected[block_of(name)], abs=1e-9)
        # Wanda's per-row mask at the block's sparsity, on the norms the sequential pass saw.
        assert int(layer.pruned_count.sum()) == layer.out_features * int(
            layer.in_features * expected[block_of(name)]
        )
        ref = ref_wanda_mask(layer.weight.detach(), layer.input_sq, expected[block_of(name)])
        assert torch.equal(layer.mask(), ref), name
    mean = sum(expected.values()) / len(expected)
    assert mean == pytest.approx(0.6)


def test_a_profile_scales_with_the_schedule_and_starts_learned_thresholds_apart(tiny_model):
    config = experiment("pst", final_sparsity=0.5, mask="threshold")
    _, _, layers = injected(tiny_model, config)
    controller = SparsityController(pst_method(config.pst), 10, layers)
    names = list(layers)
    controller.profile = {n: (0.3 if i % 2 else 0.7) for i, n in enumerate(names)}
    controller.apply(10)  # final sparsity: each layer at its profile's, counted over all logits
    for i, name in enumerate(names):
        assert layers[name].sparsity == pytest.approx(0.3 if i % 2 else 0.7, abs=0.02), name
    fixed = experiment("pst", final_sparsity=0.5)
    _, _, layers = injected(tiny_model, fixed)
    controller = SparsityController(pst_method(fixed.pst), 10, layers)
    controller.profile = {n: (0.3 if i % 2 else 0.7) for i, n in enumerate(layers)}
    halfway = controller.sparsity_at(5)
    controller.apply(5)
    for i, layer in enumerate(layers.values()):
        target = halfway * (0.6 if i % 2 else 1.4)
        assert layer.sparsity == pytest.approx(target, abs=1 / layer.weight.numel() + 1e-9)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"pst": {"sparsity_profile": "owl", "init": "magnitude"}},
            "sets each block's sparsity from calibration data",
        ),
        (
            {
                "pst": {
                    "sparsity_profile": "owl",
                    "init": "wanda",
                    "importance": "activation",
                    "mask": "nm",
                    "final_sparsity": 0.5,
                }
            },
            "pattern fixes it",
        ),
        ({"pst": {"owl_lmbda": 0.7}}, "owl_lmbda"),
    ],
)
def test_owl_settings_it_cannot_follow_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(data)
