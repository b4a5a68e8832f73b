"""Wanda and SparseGPT (one-shot methods, and PST's warm start) against independent references.

The references run on a plain copy of the model (no injection): forward hooks on its
nn.Linear modules gather the calibration inputs block by block, and the pruning is written
out by the papers' formulas with stable sorts and a non-lazy OBS sweep.
"""

import copy

import pytest
import torch
from conftest import pst_method
from torch import nn

from pst_ds.config import ConfigError, OneShotConfig, PSTConfig
from pst_ds.experiment import experiment_from_dict
from pst_ds.layers.inject import inject_pst, iter_pst_layers
from pst_ds.masks.kinds import NM, TopK
from pst_ds.methods import Calibration, method_class
from pst_ds.oneshot.calibrate import chained, in_blocks
from pst_ds.oneshot.sparsegpt import sparsegpt_prune
from pst_ds.train.schedule import SparsityController

# ---------------------------------------------------------------- references


def ref_hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([x.reshape(-1, x.shape[-1]).double() for x in inputs])
    return (flat.t() @ flat / flat.shape[0]).float()


def ref_sparsegpt(W, H, sparsity=None, nm=None, block=8, damp=0.01):
    """The OBS sweep column by column, every later column updated at once (no lazy batching)."""
    W, H = W.clone().double(), H.clone().double()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    total = int(rows * cols * sparsity) if sparsity is not None else 0
    prune = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        if nm is None:  # this block's share of the matrix's count, by saliency at the block's start
            due = total * end // cols - total * start // cols
            saliency = (W[:, start:end] ** 2 / torch.diag(Hinv)[start:end] ** 2).reshape(-1)
            chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
            chosen[saliency.argsort(stable=True)[:due]] = True
            prune[:, start:end] = chosen.view(rows, end - start)
        for i in range(start, end):
            if nm is not None and (i - start) % nm[1] == 0:
                n, m = nm
                group = W[:, i : i + m] ** 2 / torch.diag(Hinv)[i : i + m] ** 2
                for r in range(rows):
                    prune[r, i + group[r].argsort(stable=True)[: group.shape[1] - n]] = True
            q = torch.where(prune[:, i], 0.0, W[:, i])
            err = (W[:, i] - q) / Hinv[i, i]
            W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
            W[:, i] = q
    return W.float(), ~prune


def ref_wanda_mask(W, input_sq, sparsity):
    """Wanda's per-output-row comparison of |W_ij| ||x_j||, the lowest pruned (stable sort)."""
    score = W.abs() * input_sq.sqrt()
    keep = torch.ones_like(W, dtype=torch.bool)
    k = int(W.shape[1] * sparsity)
    for r in range(W.shape[0]):
        keep[r, score[r].argsort(stable=True)[:k]] = False
    return keep


def linear_blocks(model):
    """The plain model's targeted linears, grouped by block in model order."""
    cfg = PSTConfig.release()
    from pst_ds.config import name_matches

    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and name_matches(n, cfg.target_modules)
    ]
    return [[(n, model.get_submodule(n)) for n in group] for group in in_blocks(names, sequential=True)]


def ref_sequential(model, batches, prune_layer, sequential=True):
    """Calibrate block by block on the plain model, each block seeing the blocks pruned before it
    (or, not sequential, every layer on the dense model)."""
    blocks = linear_blocks(model)
    for group in blocks if sequential else [[pair for block in blocks for pair in block]]:
        inputs = {name: [] for name, _ in group}
        hooks = [
            module.register_forward_pre_hook(
                lambda _m, args, seen=inputs[name]: seen.append(args[0].detach())
            )
            for name, module in group
        ]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for name, module in group:
                module.weight.copy_(prune_layer(module.weight, inputs[name]))


# ---------------------------------------------------------------- helpers


def calibration(n=3, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 200, (2, length), generator=g)} for _ in range(n)]


def one_shot(method, model, layers, batches, sparsity, **oneshot):
    """One-shot ``method`` (wanda, sparsegpt) on ``layers`` from ``batches``, as a warm start runs it."""

    def put_in_force(group, value):
        for layer in group.values():
            layer.sparsity = value

    run = Calibration(model, layers, batches, lambda b: model(**b), sparsity, put_in_force)
    method_class(method).calibrate(run, OneShotConfig(**oneshot))


def experiment(method, **pst):
    return experiment_from_dict({"method": method, "pst": {"compile": False, **pst}})


def injected(tiny_model, config):
    model = tiny_model("tiny_llama")
    reference = copy.deepcopy(model)
    inject_pst(model, config.pst, config.method)
    return model, reference, dict(iter_pst_layers(model))


# ---------------------------------------------------------------- SparseGPT on one matrix


@pytest.mark.parametrize(
    "kind, nm, sparsity",
    [
        (TopK("matrix"), None, 0.5),
        (TopK("matrix"), None, 0.7),
        (NM(2, 4), (2, 4), 0.5),
        (NM(1, 4), (1, 4), 0.75),
    ],
)
def test_sparsegpt_matches_the_non_lazy_obs_sweep(kind, nm, sparsity):
    torch.manual_seed(0)
    rows, cols = 12, 30  # 30 columns: a ragged last block (block 8) and last N:M group
    W = torch.randn(rows, cols)
    X = torch.randn(200, cols) * torch.linspace(0.2, 3.0, cols)  # unequal input scales
    X[:, 5] = 0  # a dead input
    H = X.t() @ X / X.shape[0]
    pruned = kind.pruned_count(rows, cols, sparsity)
    got = sparsegpt_prune(W, H, kind, pruned, block_columns=8, damp=0.01)
    expected, keep = ref_sparsegpt(W, H, sparsity=None if nm else sparsity, nm=nm, block=8)
    assert torch.equal(got != 0, keep)  # the same mask, exactly
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # and the same updated weights
    assert int((got == 0).sum()) == int(pruned)
    assert (got[:, 5] == 0).all()
    if nm:
        assert kind.pattern_problem(got != 0, pruned) is None


def test_sparsegpt_row_scope_prunes_each_row_exactly_and_lowers_the_output_error():
    torch.manual_seed(0)
    # Correlated inputs (rank 12 plus noise), as a layer's are: what is pruned can be compensated.
    W, X = torch.randn(10, 40), torch.randn(300, 12) @ torch.randn(12, 40) + 0.1 * torch.randn(300, 40)
    H = X.t() @ X / X.shape[0]
    kind = TopK("row")
    got = sparsegpt_prune(W, H, kind, kind.pruned_count(10, 40, 0.5), block_columns=16)
    assert ((got == 0).sum(1) == 20).all()
    keep = got != 0
    masked_only = X @ (W * keep).t()  # the same mask without SparseGPT's update of the kept weights
    dense = X @ W.t()
    assert (X @ got.t() - dense).norm() < 0.8 * (masked_only - dense).norm()


def test_sparsegpt_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="multiple of pst.mask_m"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), NM(2, 4), torch.tensor(16), block_columns=6)
    with pytest.raises(ConfigError, match="not vnm"):
        experiment("sparsegpt", mask="vnm", mask_m=4, final_sparsity=0.5)


# ---------------------------------------------------------------- on a tiny model, block by block


@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_on_a_tiny_llama_matches_the_reference(tiny_model, sequential):
    config = experiment("wanda", final_sparsity=0.5)
    pst = method_class("wanda").layer_config(config.pst)  # what Wanda's layers are built with
    assert (pst.init, pst.importance, pst.mask_scope) == ("wanda", "activation", "row")
    model, reference, layers = injected(tiny_model, config)
    batches = calibration()
    one_shot("wanda", model, layers, batches, 0.5, sequential=sequential)

    def wanda(weight, inputs):
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
        return weight * ref_wanda_mask(weight, x.pow(2).mean(0), 0.5)

    ref_sequential(reference, batches, wanda, sequential)
    for name, layer in layers.items():
        expected = reference.get_submodule(name).weight != 0
        assert torch.equal(layer.mask(), expected), name
    with torch.no_grad():
        ids = calibration(1, seed=7)[0]
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "activation"])  # activation: norms and Hessians both
def test_sparsegpt_on_a_tiny_llama_matches_the_sequential_reference(tiny_model, importance):
    config = experiment("sparsegpt", final_sparsity=0.5, importance=importance)
    model, reference, layers = injected(tiny_model, config)
    batches = calibration()
    one_shot("sparsegpt", model, layers, batches, 0.5, block_columns=16)
    ref_sequential(
        reference, batches, lambda w, inputs: ref_sparsegpt(w, ref_hessian(inputs), 0.5, block=16)[0]
    )
    for name, layer in layers.items():
        expected = reference.get_submodule(name).weight
        assert torch.equal(layer.mask(), expected != 0), name
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-3, atol=1e-4)
        assert int(layer.pruned) == expected.numel() // 2


def test_pst_warm_start_first_mask_is_the_one_shot_mask(tiny_model):
    """PST with pst.init=wanda: the first training forward uses exactly Wanda's mask."""
    config = experiment("pst", init="wanda", importance="activation", mask_scope="row", final_sparsity=0.5)
    model, reference, layers = injected(tiny_model, config)
    batches = calibration()
    controller = SparsityController(pst_method(config.pst), 10, layers)
    assert controller.sparsity_at(0) == controller.sparsity_at(7) == 0.5  # held at final from the start
    one_shot("wanda", model, layers, batches, controller.sparsity_at(0))
    controller.apply(0, logged=True)
    assert not controller.board.record.gathering  # calibration gathered the norms, not the first step

    def wanda(weight, inputs):
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
        return weight * ref_wanda_mask(weight, x.pow(2).mean(0), 0.5)

    ref_sequential(reference, batches, wanda)
    model.train()
    noted = {}
    for name, layer in layers.items():
        layer.settling.note = lambda mask, name=name: noted.__setitem__(name, mask.clone())
    model(**calibration(1, seed=3)[0]).logits.sum().backward()
    for name, layer in layers.items():
        assert torch.equal(noted[name], reference.get_submodule(name).weight != 0), name
        assert layer.U.grad.abs().sum() > 0  # and it trains from there (LoRA's form: U = 0 takes it)


def test_blocks_run_one_at_a_time_only_when_they_chain():
    assert chained(["model.layers.0", "model.layers.1", "model.layers.2"])
    assert chained(["model.layers.3"])
    assert not chained(["model.layers.0", "model.layers.2"])  # a block between them untargeted
    assert not chained(["encoder.layer.0", "decoder.layer.1"])
    assert not chained(["lm_head"])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "data, message",
    [
        ({"pst": {"init": "wanda", "importance": "magnitude"}}, "pst.init=wanda keeps Wanda's mask in force"),
        ({"pst": {"init": "lasso"}}, "pst.init must be one of magnitude, sparsegpt, wanda, zeros, auto"),
        ({"method": "movement", "pst": {"init": "sparsegpt"}}, "warm-starts magnitude, masked_lora, pst"),
        ({"method": "magnitude", "train": {"distill": {"weight": 0.5}}}, "frozen dense backbone"),
        ({"train": {"distill": {"weight": 1.5}}}, r"distill.weight must be a number in \[0, 1\] or 'auto'"),
        ({"oneshot": {"damp": 0}}, "oneshot.damp must be > 0"),
    ],
)
def test_bad_one_shot_and_distill_settings_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(data)


@pytest.mark.parametrize(
    "pst, distill, start",
    [
        ({"final_sparsity": 0.7}, 0.0, "sparsegpt"),  # measured best at 70%
        ({"final_sparsity": 0.5}, 0.0, "wanda"),
        ({"final_sparsity": 0.7}, 0.5, "sparsegpt"),  # its teacher keeps a copy of the original weights
        ({"final_sparsity": 0.5, "mask": "nm"}, 0.0, "wanda"),
        ({"final_sparsity": 0.6, "mask": "vnm", "mask_m": 5}, 0.0, "wanda"),  # SparseGPT cannot do V:N:M
        ({"final_sparsity": 0.7, "importance": "magnitude"}, 0.0, "sparsegpt"),
        ({"final_sparsity": 0.8, "importance": "magnitude", "mask": "vnm", "mask_m": 10}, 0.0, "magnitude"),
    ],
)
def test_auto_start_is_the_measured_best_the_run_can_use(pst, distill, start):
    data = {
        "pst": {"init": "auto", "importance": "activation", **pst},
        "train": {"distill": {"weight": distill}},
    }
    config = experiment_from_dict(data)
    assert config.pst.init == start  # resolved once: the saved config and the checkpoints say which
    smp = experiment_from_dict({**data, "method": "smp", "pst": {"init": "auto", **pst}})
    assert smp.pst.init == "magnitude"  # a method that takes no warm start starts from |W|


@pytest.mark.parametrize(
    "method, pst, weight",
    [
        ("pst", {"final_sparsity": 0.7}, 0.5),  # SparseGPT's start rewrote W: distil from a copy
        ("pst", {"final_sparsity": 0.5}, 0.5),  # Wanda's start: from the frozen backbone itself
        ("pst", {"final_sparsity": 0.7, "init": "magnitude"}, 0.5),
        ("lora", {"final_sparsity": 0.7}, 0.5),  # a frozen backbone, nothing pruned
        ("sparsegpt", {"final_sparsity": 0.7}, 0.0),  # one-shot: no training, no teacher
        ("magnitude", {"final_sparsity": 0.7}, 0.0),  # trains W: no frozen teacher to distil from
        ("pst", {"final_sparsity": 0.7, "trainable_modules": ["lm_head"]}, 0.0),  # a head without teacher
    ],
)
def test_auto_distillation_wherever_the_original_model_can_teach(method, pst, weight):
    data = {
        "method": method,
        "pst": {"init": "auto", "importance": "activation", **pst},
        "train": {"distill": {"weight": "auto"}},
    }
    config = experiment_from_dict(data)
    assert config.train.distill.weight == weight
    copied = weight > 0 and config.pst.init == "sparsegpt"  # a copy only where the start rewrites W
    assert method_class(method)(config).keeps_dense_teacher() is copied
