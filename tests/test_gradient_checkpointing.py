"""train.gradient_checkpointing with PST layers: the same loss and factor gradients, fewer saved
activations (in one process); the same training under ZeRO-3 on two ranks: test_distributed.py."""

import torch
from conftest import pst_method

from pst_ds.config import PSTConfig
from pst_ds.io.models import enable_gradient_checkpointing
from pst_ds.layers.inject import inject_pst, iter_pst_layers
from pst_ds.train.schedule import SparsityController

CONFIG = PSTConfig.release(weight_rank=4, mask_rank=4, importance="activation")


def loss_grads_and_saved_bytes(model, batch):
    """(loss, every factor's gradient, bytes autograd saved for backward) of one step, with the
    input statistics gathered in forward only, as the trainer runs it."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()  # checkpointing runs each block's forward again here: no input is counted twice
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


def test_checkpointing_keeps_loss_and_factor_gradients_and_saves_less(tiny_model):
    model = tiny_model("tiny_llama")
    inject_pst(model, CONFIG, "pst")
    model.train()
    torch.manual_seed(3)
    layers = dict(iter_pst_layers(model))
    SparsityController(pst_method(CONFIG), 1, layers).apply(0)  # the first step gathers input norms
    assert next(iter(layers.values())).board.record.gathering
    for layer in layers.values():
        layer.sparsity = 0.5
        layer.U.data.normal_()  # so that every factor gets a gradient, whichever starts at 0
        layer.V.data.normal_()
        layer.B.data.normal_()
    ids = torch.randint(0, 256, (2, 48))
    batch = {"input_ids": ids, "labels": ids}

    plain_loss, plain_grads, plain_saved = loss_grads_and_saved_bytes(model, batch)
    plain_stats = {
        name: (layer.input_stats.square_sum.clone(), layer.input_stats.tokens)
        for name, layer in iter_pst_layers(model)
    }
    for _, layer in iter_pst_layers(model):
        layer.input_stats.square_sum, layer.input_stats.tokens = None, 0
    enable_gradient_checkpointing(model)
    loss, grads, saved = loss_grads_and_saved_bytes(model, batch)

    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() and any(".U" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name
    assert saved < 0.6 * plain_saved  # the blocks' activations are recomputed, not kept
    for name, layer in iter_pst_layers(model):  # the recomputation is not observed twice
        assert layer.input_stats.tokens == plain_stats[name][1] == 2 * 48
        torch.testing.assert_close(layer.input_stats.square_sum, plain_stats[name][0], rtol=0, atol=0)
