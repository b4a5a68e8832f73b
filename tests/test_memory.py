"""The memory model (pst_ds/train/memory.py) against what a real PST model does on a tiny Llama; its
stored bytes against a 2-rank ZeRO-3 engine's: test_distributed.py."""

import torch

from pst_ds.experiment import load_experiment
from pst_ds.io.models import load_model, load_tokenizer
from pst_ds.layers.inject import inject_pst, iter_pst_layers
from pst_ds.methods import method_class
from pst_ds.train.memory import estimate, meta_model, saved_activation_bytes, trained_weights

BATCH, LENGTH = 2, 64


def measured_saved_bytes(model) -> int:
    """Bytes autograd really saves in one training forward of ``model`` (weights excluded),
    plus the gradient of the largest (the model's own rule for backward's transient)."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):  # each storage once: the memory it really holds
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved.append(storage.nbytes())
        return tensor

    ids = torch.randint(0, 200, (BATCH, LENGTH))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(saved) + 2 * max(saved)


def test_activations_on_the_meta_device_match_a_real_pst_forward():
    config = load_experiment("configs/experiments/tiny_llama.yaml", ["pst.final_sparsity=0.5"])
    model = load_model(config.model, load_tokenizer(config.model))
    inject_pst(model, config.pst, config.method)
    for _, layer in iter_pst_layers(model):
        layer.sparsity = 0.5
    model.train()
    real = measured_saved_bytes(model)
    adapted = {name for name, _ in iter_pst_layers(model)}
    predicted, checkpointed = [], []
    for checkpointing, out in ((False, predicted), (True, checkpointed)):
        plain = meta_model(method_class(config.method)(config), inject=False)
        trained_weights(plain, adapted, everything=False)
        out.append(saved_activation_bytes(plain, BATCH, LENGTH, 4, checkpointing))
    (predicted,), (checkpointed,) = predicted, checkpointed
    assert abs(predicted - real) / real < 0.15, (predicted, real)
    blocks_inputs = 2 * BATCH * LENGTH * 64 * 4  # 2 blocks keep their (batch, length, 64) input
    assert blocks_inputs < checkpointed < predicted


def test_estimate_counts_what_zero3_shards_and_what_it_does_not():
    config = load_experiment("configs/experiments/tiny_llama.yaml")
    model = meta_model(method_class(config.method)(config))
    numel = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    one, four = (estimate(config, zero3, world, on_gpu=True) for world in (1, 4))
    assert one.parameters == numel * 4 and one.optimizer == trainable * 12
    assert numel <= four.parameters <= numel + 4 * 4 * 100  # a quarter each, padded per weight
    assert four.optimizer == -(-trainable // 4) * 12 and four.activations == one.activations
    bf16 = estimate(config, {**zero3, "bf16": {"enabled": True}}, 1, on_gpu=True)
    assert bf16.parameters == numel * 2 and bf16.activations < one.activations
    offload = {"zero_optimization": {**zero3["zero_optimization"], "offload_optimizer": {"device": "cpu"}}}
    offloaded = estimate(config, offload, 1, on_gpu=True)
    assert offloaded.on_host == one.optimizer and offloaded.total == one.total - one.optimizer
    assert estimate(config, offload, 1, on_gpu=False).on_host == 0  # a CPU rank's host is its device


def test_mask_bits_kept_between_passes_are_counted():
    """pst.saved_mask=bits keeps out*in/8 bytes per pruned layer from forward to backward: all of
    them without checkpointing, one block's with it; recompute and learned thresholds keep none."""
    zero3 = {"zero_optimization": {"stage": 3}}
    path = "configs/experiments/tiny_llama.yaml"
    numel = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)  # q, o; k, v; gate, up, down in 2 blocks

    def buffers(*overrides):
        return estimate(load_experiment(path, list(overrides)), zero3, 1, on_gpu=True).pst_buffers

    recompute = buffers("pst.saved_mask=recompute")
    assert buffers() - recompute == numel // 8
    assert buffers("train.gradient_checkpointing=true") - recompute == numel // 8 // 2
    assert buffers("pst.mask=threshold") == recompute
