"""Evaluation of any model (a live engine during training, or a loaded HF folder) on a dataset
from pst_ds.data, on one process or split over ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn

from .data import collate_for, labelled_positions


@torch.no_grad()
def perplexity(loss: float) -> float:
    """exp(mean token loss); inf where a diverged loss overflows it."""
    return math.exp(loss) if loss < 709.0 else math.inf


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean loss and perplexity (causal LM) or accuracy (classification) over ``dataset``: the
    loss per labelled token (per example for a classifier), as training counts it, so neither
    the batch size nor the world size moves it.

    With a process group, each rank takes every world_size-th example and the sums are
    all-reduced; every rank runs the same number of forwards (ZeRO-3's gathers are collective),
    a rank whose share has run out repeating an example with weight 0.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device or next(model.parameters()).device
    collate = collate_for(task)
    mine = list(range(rank, len(dataset), world))
    rounds = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    was_training = model.training
    model.eval()
    loss_sum, correct, count, tokens = 0.0, 0, 0, 0
    for i in range(rounds):
        indices = mine[i * batch_size : (i + 1) * batch_size]
        inputs = {k: v.to(device) for k, v in collate([dataset[j] for j in indices or [0]]).items()}
        output = model(**inputs)  # its loss: the mean over this batch's labelled tokens
        counted = int(labelled_positions(inputs["labels"], output.logits).sum()) if indices else 0
        loss_sum += output.loss.item() * counted if counted else 0.0
        count += len(indices)
        tokens += counted
        if task == "sequence_classification" and indices:
            correct += int((output.logits.argmax(-1) == inputs["labels"]).sum())
    model.train(was_training)
    if world > 1:
        totals = torch.tensor([loss_sum, correct, count, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, correct, count, tokens = totals.tolist()
    result = {"examples": int(count), "tokens": int(tokens), "loss": loss_sum / max(tokens, 1)}
    if task == "sequence_classification":
        result["accuracy"] = correct / count
    else:
        result["perplexity"] = perplexity(result["loss"])
    return result
