"""Distillation from the frozen dense backbone: the teacher is the model with its layers switched off."""

import math

import pytest
import torch
import torch.nn.functional as F

from pst_ds.experiment import experiment_from_dict
from pst_ds.layers.inject import inject_pst, iter_pst_layers
from pst_ds.train.distill import distillation_loss, soft_kl, teacher_forward

IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))


def injected(tiny_model, method="pst", sparsity=0.0):
    model = tiny_model("tiny_llama")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = experiment_from_dict({"method": method, "pst": {"compile": False}})
    inject_pst(model, config.pst, method, config.lora)
    for _, layer in iter_pst_layers(model):
        layer.sparsity = sparsity
    return model, dense


def test_soft_kl_matches_its_definition():
    torch.manual_seed(0)
    s, t, T = torch.randn(3, 5, 11), torch.randn(3, 5, 11), 2.0
    p = F.softmax(t / T, -1)
    expected = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(soft_kl(s, t, T), expected)
    loss, kl = distillation_loss(torch.tensor(3.0), s, t, 0.25, T)
    torch.testing.assert_close(loss, 0.75 * 3.0 + 0.25 * T * T * expected)


def test_teacher_is_the_dense_backbone_and_leaves_no_graph(tiny_model):
    model, dense_params = injected(tiny_model, sparsity=0.5)
    with torch.no_grad():  # the update moved: the student differs from the teacher in mask and update
        for _, layer in iter_pst_layers(model):
            layer.U.normal_()
            layer.V.normal_()
    plain = tiny_model("tiny_llama")  # the same seed: the untouched dense model
    with torch.no_grad(), teacher_forward():
        teacher = model(input_ids=IDS).logits
    assert teacher.grad_fn is None and not teacher.requires_grad
    torch.testing.assert_close(teacher, plain(input_ids=IDS).logits.detach())
    student = model(input_ids=IDS).logits
    assert student.grad_fn is not None and not torch.allclose(student, teacher)


@pytest.mark.parametrize("method", ["pst", "lora"])
def test_at_sparsity_zero_the_kl_is_zero_and_its_gradient_vanishes(tiny_model, method):
    """lambda = 1, masks dense, U V = 0 (V = 0; LoRA's B = 0): student == teacher."""
    model, _ = injected(tiny_model, method)
    model.train()
    with torch.no_grad(), teacher_forward():
        teacher = model(input_ids=IDS).logits
    output = model(input_ids=IDS, labels=IDS)
    loss, kl = distillation_loss(output.loss, output.logits, teacher, weight=1.0, temperature=2.0)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or float(g.abs().max()) < 1e-6 for g in grads)
    # The hard loss alone does move them: the vanishing gradient is the KL's, not a dead graph.
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) > 1e-4
    assert math.isfinite(float(output.loss.detach()))
