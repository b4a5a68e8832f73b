"""Evaluation of any model (a live one or a loaded HF folder) on a dataset from pst_ds.data."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn

from .data import collate_for


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, task: str, batch_size: int = 8) -> dict[str, float]:
    """Mean loss and perplexity (causal LM) or accuracy (classification) over ``dataset``."""
    collate = collate_for(task)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = {key: value.to(device) for key, value in collate(rows).items()}
        output = model(**inputs)
        loss_sum += output.loss.item() * len(rows)
        if task == "sequence_classification":
            correct += int((output.logits.argmax(-1) == inputs["labels"]).sum())
    model.train(was_training)
    result = {"examples": len(dataset), "loss": loss_sum / len(dataset)}
    if task == "sequence_classification":
        result["accuracy"] = correct / len(dataset)
    else:
        result["perplexity"] = math.exp(result["loss"])
    return result
