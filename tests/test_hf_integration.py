"""The HF Trainer integration in this process, without DeepSpeed: what PSTTrainer adds to a
Trainer (its optimizer groups, distillation in compute_loss) against independent references,
and what prepare refuses. The launched, ZeRO-3 equality with pst-ds's loop: test_hf_trainer.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from transformers import Trainer, TrainingArguments

from pst_ds.config import ConfigError
from pst_ds.experiment import load_experiment
from pst_ds.integrations.hf import PSTTrainer, deepspeed_config, prepare
from pst_ds.io.models import load_model, load_tokenizer
from pst_ds.layers.base import dense_forward

TINY = "configs/experiments/tiny_llama.yaml"


def prepared(overrides: list[str]):
    config = load_experiment(TINY, ["pst.compile=false", *overrides])
    torch.manual_seed(0)
    model = load_model(config.model, load_tokenizer(config.model))
    return model, prepare(model, config)


def trainer_for(tmp_path, model, pst, **kwargs) -> PSTTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    return PSTTrainer(pst, model=model, args=args)


def test_each_job_trains_at_its_own_learning_rate(tmp_path):
    model, pst = prepared(["train.importance_lr=0.003", "pst.mask=threshold", "train.threshold_lr=0.05"])
    trainer = trainer_for(tmp_path, model, pst, learning_rate=0.01, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    layers = pst.layers.values()
    assert by_lr[0.01] == {id(p) for layer in layers for p in (layer.U, layer.V)}  # args.learning_rate
    assert by_lr[0.003] == {id(p) for layer in layers for p in (layer.A, layer.B, layer.R, layer.C)}
    assert by_lr[0.05] == {id(layer.threshold_logit) for layer in layers}
    assert all(group["weight_decay"] == 0.1 for group in optimizer.param_groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trainable


def test_distillation_in_compute_loss_is_the_documented_loss_per_labelled_token(tmp_path):
    model, pst = prepared(["train.distill.weight=0.4", "train.distill.temperature=2.0"])
    trainer = trainer_for(tmp_path, model, pst)
    for layer in pst.layers.values():
        layer.sparsity = 0.5  # the student is pruned, the teacher is not
    input_ids = torch.randint(0, 200, (2, 16))
    labels = input_ids.clone()
    labels[0, :9] = -100  # a prompt: positions 0-7 of row 0 predict nothing the loss counts
    batch = {"input_ids": input_ids, "labels": labels}
    # Reference: the teacher is the same model with every layer dense; KL at T=2, scaled by T^2,
    # at the positions whose next token is labelled (row 0: 8-14, row 1: 0-14).
    with torch.no_grad():
        with dense_forward():
            teacher = model(input_ids=input_ids).logits
        student = model(input_ids=input_ids).logits
    p_t, log_q = F.softmax(teacher / 2.0, -1), F.log_softmax(student / 2.0, -1)
    kl = (p_t * (p_t.log() - log_q)).sum(-1)  # (2, 16)
    counted = torch.zeros(2, 16, dtype=torch.bool)
    counted[0, 8:15], counted[1, :15] = True, True
    vocab = student.shape[-1]
    ce = F.cross_entropy(student[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="none")
    ce_sum, kl_sum = ce.sum(), kl[counted].sum()  # cross_entropy's ignored positions give 0
    assert not torch.allclose(teacher, student)
    loss = trainer.compute_loss(model, batch)  # alone: the mean over its 22 labelled tokens
    torch.testing.assert_close(loss.detach(), (0.6 * ce_sum + 0.4 * 4.0 * kl_sum) / 22)
    # In an accumulated batch of 50 labelled tokens: its sums over the whole batch's count.
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(loss.detach(), (0.6 * ce_sum + 0.4 * 4.0 * kl_sum) / 50)


def test_prepare_refuses_a_method_that_does_not_train():
    config = load_experiment(TINY, ["method=wanda"])
    with pytest.raises(ConfigError, match="method=wanda prunes once and does not train"):
        prepare(torch.nn.Linear(2, 2), config)


def test_the_trainer_fills_the_batch_sizes_of_a_pst_ds_deepspeed_config():
    config = deepspeed_config("configs/zero3.json")
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    assert config["zero_optimization"]["stage"] == 3 and "train_batch_size" not in config


def test_the_run_end_must_come_after_the_callbacks_it_outlives(tmp_path):
    model, pst = prepared([])
    callbacks = pst.callbacks(tmp_path / "run")
    assert type(callbacks[-1]).__name__ == "RunEndCallback"  # the order pst.callbacks gives
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    PSTTrainer(pst, model=model, args=args, callbacks=callbacks)  # in its order: accepted
    shuffled = [callbacks[-1], *callbacks[:-1]]
    with pytest.raises(ConfigError, match="RunEndCallback must come after RunLockCallback, Preempt"):
        PSTTrainer(pst, model=model, args=args, callbacks=shuffled)


def test_a_second_optimizer_keeps_every_side_learning_rate(tmp_path):
    model, pst = prepared(["train.importance_lr=0.003"])
    trainer = trainer_for(tmp_path, model, pst, learning_rate=0.01)
    first = {g["lr"]: len(g["params"]) for g in trainer.create_optimizer().param_groups}
    trainer.optimizer = None  # as a Trainer that builds its optimizer again (a new train())
    second = {g["lr"]: len(g["params"]) for g in trainer.create_optimizer().param_groups}
    assert second == first and set(first) == {0.01, 0.003}


def test_a_trainer_whose_overridden_internals_differ_is_refused_with_the_supported_range():
    from pst_ds.integrations.hf import check_trainer_internals

    check_trainer_internals()  # this transformers: supported

    class Renamed(Trainer):  # a release that renamed _finalize_training: the override is never called
        _finalize_training = None

    class Reshaped(Trainer):
        def _save_checkpoint(self, model, trial, metrics=None): ...

    with pytest.raises(ConfigError, match=r"transformers>=5.22.2,<5.26: .*_finalize_training differs"):
        check_trainer_internals(Renamed)
    with pytest.raises(ConfigError, match=r"_save_checkpoint differs \(its parameters are"):
        check_trainer_internals(Reshaped)


def test_the_supported_transformers_range_is_setup_pys():
    from pst_ds.integrations.hf import SUPPORTED_TRANSFORMERS

    assert f'"transformers{SUPPORTED_TRANSFORMERS}"' in (ROOT / "setup.py").read_text()
