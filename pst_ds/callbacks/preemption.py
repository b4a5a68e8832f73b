"""Preemption in a Trainer's loop: a scheduler's notice (SIGTERM, SIGUSR1, the end of the
``deepspeed`` command; train/preemption.py) turned into a checkpoint and a stop.

After every optimizer step the ranks agree whether any of them had a notice (one all-reduce of
one number); if so, the Trainer saves (``control.should_save``) and stops. ``stopped`` then says
why, and the script exits with ``PREEMPTED_EXIT`` (75): the same command resumes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from ..train.preemption import PREEMPTED_EXIT, PreemptionNotice

__all__ = ["PREEMPTED_EXIT", "PreemptionCallback"]


class PreemptionCallback(TrainerCallback):
    def __init__(self) -> None:
        self.notice: PreemptionNotice | None = None
        self.stopped: str | None = None  # what stopped the run, once it did (None: it was not)
        self.stopped_at: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.notice = PreemptionNotice()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        signalled = float(self.notice.pending())
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signalled], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag)
            signalled = float(flag.item())
        if signalled > 0 and state.global_step < state.max_steps:
            self.stopped = self.notice.received or "a signal on another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.notice is not None:
            self.notice.uninstall()
