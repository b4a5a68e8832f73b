"""Evaluation of any causal LM (a live model or a loaded HF folder) on packed text blocks."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn

from .data import collate_blocks


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Dataset, batch_size: int = 8) -> tuple[float, float]:
    """(mean token loss, perplexity) over ``blocks``; every block has the same length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = 0.0
    for start in range(0, len(blocks), batch_size):
        input_ids = collate_blocks([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
        input_ids = input_ids.to(device)
        loss_sum += model(input_ids=input_ids, labels=input_ids).loss.item() * len(input_ids)
    model.train(was_training)
    loss = loss_sum / len(blocks)
    return loss, math.exp(loss)
