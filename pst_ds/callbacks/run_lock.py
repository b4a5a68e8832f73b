"""One run per output folder: a second Trainer run into a folder that a live run is writing is
refused (train/run_lock.py), from the start of training to its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from ..train.distributed import agreed
from ..train.run_lock import RunLock


class RunLockCallback(TrainerCallback):
    """Holds ``<folder>/run.lock`` (rank 0 takes it; every rank learns of a refusal). A script
    that must be refused before it loads the model calls ``acquire`` first itself."""

    def __init__(self, folder: str | Path) -> None:
        self.lock = RunLock(Path(folder))
        self.held = False  # on every rank (rank 0 holds the file)

    def acquire(self, rank_zero: bool) -> None:
        if self.held:
            return
        take = lambda: self.lock.acquire(lambda m: print(f"pst-ds: warning: {m}", flush=True))  # noqa: E731
        if dist.is_initialized():
            agreed(take, run_here=rank_zero)
        else:
            take()
        self.held = True

    def release(self) -> None:
        self.lock.release()
        self.held = False

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.acquire(state.is_world_process_zero)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.release()
