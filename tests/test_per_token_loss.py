"""The loss a Trainer user expects: the mean over the labelled tokens of the whole accumulated
batch (transformers' ``num_items_in_batch``), so that how a batch is split into micro-batches
does not change what trains; and an evaluation weighted by token, whatever its batch size."""

import json
import random

import pytest
import torch

from pst_ds.experiment import load_experiment
from pst_ds.integrations.run import build_run
from pst_ds.io.data import collate_for, labelled_positions, load_splits
from pst_ds.io.evaluate import evaluate_model
from pst_ds.io.models import load_tokenizer
from pst_ds.train.distributed import leave_process_group
from pst_ds.train.engine import load_ds_config


def completion_records(path) -> str:
    """Prompt/completion records of uneven lengths: packed blocks then carry different numbers
    of labelled tokens, where a mean of per-micro-batch means and a per-token mean differ."""
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they".split()
    records = [
        {
            "prompt": " ".join(rng.choices(words, k=rng.randint(3, 30))) + "?",
            "completion": " " + " ".join(rng.choices(words, k=rng.randint(1, 12))) + ".",
        }
        for _ in range(400)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def overrides(tmp_path, data: str, micro: int, accumulation: int) -> list[str]:
    return [
        f"train.output_dir={tmp_path / f'run{micro}x{accumulation}'}",
        f"data.train_files=[{data}]",
        "data.loss_on=completion",
        "data.block_size=32",
        "train.max_steps=3",
        "train.log_every=1",
        f"train.micro_batch_size={micro}",
        f"train.gradient_accumulation_steps={accumulation}",
        "train.distill.weight=0.5",  # the distillation term is counted per token too
        "train.save_every=0",
        "train.export=false",
        "pst.compile=false",
    ]


def trained(tmp_path, data: str, micro: int, accumulation: int) -> tuple[float, dict[str, torch.Tensor]]:
    """(step 1's loss, the trainable parameters after 3 steps) of tiny_llama on ``data``."""
    settings = overrides(tmp_path, data, micro, accumulation)
    config = load_experiment("configs/experiments/tiny_llama.yaml", settings)
    run = build_run(config, load_ds_config("configs/zero2.json"))
    try:
        run.train()
    finally:
        leave_process_group()
    metrics = tmp_path / f"run{micro}x{accumulation}" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.open()]
    first = next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)
    model = run.trainer.model
    return first, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_two_by_one_and_one_by_two_train_the_same_loss_and_weights(tmp_path):
    data = completion_records(tmp_path / "pairs.jsonl")
    config = load_experiment("configs/experiments/tiny_llama.yaml", overrides(tmp_path, data, 1, 2))
    blocks = load_splits(config.data, "causal_lm", load_tokenizer(config.model)).train
    counts = {sum(t != -100 for t in blocks[i]["labels"]) for i in range(16)}
    assert len(counts) > 1  # blocks differ in labelled tokens: the two rules would disagree

    loss_2x1, weights_2x1 = trained(tmp_path, data, 2, 1)
    loss_1x2, weights_1x2 = trained(tmp_path, data, 1, 2)
    assert loss_2x1 == pytest.approx(loss_1x2, abs=1e-6)
    assert weights_2x1.keys() == weights_1x2.keys() and weights_2x1
    for name, weight in weights_2x1.items():
        torch.testing.assert_close(weights_1x2[name], weight, rtol=1e-4, atol=1e-5)  # Adam: summation order


def test_evaluation_is_per_token_whatever_the_batch_size(tmp_path, tiny_model):
    data = completion_records(tmp_path / "pairs.jsonl")
    config = load_experiment("configs/experiments/tiny_llama.yaml", [f"data.train_files=[{data}]",
                                                                     "data.loss_on=completion"])  # fmt: skip
    dataset = load_splits(config.data, "causal_lm", load_tokenizer(config.model)).validation
    model = tiny_model("tiny_llama")
    # Reference: every labelled token's loss, one block at a time, summed and divided once.
    total, tokens = 0.0, 0
    collate = collate_for("causal_lm")
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            logits = model(input_ids=batch["input_ids"]).logits
            counted = labelled_positions(batch["labels"], logits)
            targets = torch.nn.functional.pad(batch["labels"][..., 1:], (0, 1), value=-100)
            losses = torch.nn.functional.cross_entropy(logits[counted], targets[counted], reduction="none")
            total, tokens = total + float(losses.sum()), tokens + int(counted.sum())
    assert len(dataset) >= 3
    for batch_size in (1, 2, 3):
        result = evaluate_model(model, dataset, "causal_lm", batch_size)
        assert result["tokens"] == tokens
        assert result["loss"] == pytest.approx(total / tokens, rel=1e-6)


@pytest.mark.slow
def test_evaluation_on_two_ranks_gives_one_ranks_perplexity(tmp_path):
    from eval_probe import evaluated
    from helpers import launch_ranks

    data = completion_records(tmp_path / "pairs.jsonl")
    alone = evaluated(data, 3)  # one process, batches of 3
    launch_ranks(["tests/eval_probe.py", data, str(tmp_path / "two.json"), "2"], tmp_path, timeout=300)
    two = json.loads((tmp_path / "two.json").read_text())  # each rank its share, batches of 2
    assert two["tokens"] == alone["tokens"] and two["examples"] == alone["examples"]
    assert two["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
