"""The step a model's pruned layers run in: one immutable record per optimizer step.

The sparsity controller publishes a ``StepRecord`` on the model's ``StepBoard`` before each
step's forwards; the layers only read it. (Their mask counts are the one other state it
writes: the ``pruned`` buffers, saved with the model.)

A layer holds one selection per step (W and the factors change only at an optimizer step, so
every micro-batch, recompute and backward until the next would select the same mask again).
The held selection is keyed to the record's step *and* to the count of optimizer steps taken
in this process: a loop that steps its optimizer without publishing the next record still gets
a fresh mask, never a stale one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Every torch optimizer's step, DeepSpeed's inner one included (ZeRO-3 steps it once per
# sub-group: more counts, never fewer).
register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any optimizer)."""
    return _optimizer_steps


def in_backward() -> bool:
    """True inside autograd's backward: a forward run there is gradient checkpointing's recompute."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True)
class StepRecord:
    """What the forwards of one optimizer step run under."""

    step: int  # optimizer steps taken before this one
    logged: bool = False  # note the mask (and check its scores) in the step's first forward
    gathering: bool = False  # activation importance gathers this step's input norms
    # Learned thresholds: each layer's shift of its logits (the model-wide c plus its profile's prior)
    threshold_shifts: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


class StepBoard:
    """Where a model's pruned layers read the record in force (one board per model, given to
    each layer when it is built). ``record`` is None until a controller publishes one: every
    forward then selects afresh and gathers nothing."""

    def __init__(self) -> None:
        self.record: StepRecord | None = None

    def publish(self, record: StepRecord) -> None:
        self.record = record
