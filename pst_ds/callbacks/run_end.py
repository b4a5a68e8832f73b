"""The one place a run's guards come down: after the export and summary.json, on every path.

The Trainer calls each event on its callbacks in list order, so a lock released or a signal
handler removed in its own ``on_train_end`` would come down before the export and the final
evaluation that follow it. ``RunEndCallback`` is the last callback (``PSTRun.callbacks()`` puts
it there, ``PSTTrainer`` checks it at construction): it notes a scheduler's signal that came
during the end (the run then exits as preempted, and the same command finishes it), then closes
the records, removes the signal handlers (restoring the ones before) and releases the lock.
``close()`` does the same on an error path (PSTTrainer and launch/train.py call it).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainingArguments

from .preemption import PreemptionCallback
from .records import RunRecordsCallback
from .run_lock import RunLockCallback


class RunEndCallback(TrainerCallback):
    def __init__(
        self,
        lock: RunLockCallback | None,
        preemption: PreemptionCallback | None,
        records: RunRecordsCallback | None,
    ) -> None:
        self.lock, self.preemption, self.records = lock, preemption, records
        self.guarded = [c for c in (lock, preemption, records) if c is not None]

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.preemption is not None:
            self.preemption.note_signal_after_training(state)  # collective: every rank is here
        self.close()

    def close(self) -> None:
        """Records closed, signal handlers restored, lock released (idempotent)."""
        for callback in (self.records, self.preemption, self.lock):
            if callback is not None:
                callback.close()


def check_order(callbacks: list[Any]) -> None:
    """Raise ValueError unless each RunEndCallback comes after everything it guards and after
    every other callback that acts at the end of training (the export, the records)."""
    for index, callback in enumerate(callbacks):
        if isinstance(callback, RunEndCallback):
            later = [c for c in callbacks[index + 1 :] if c in callback.guarded or _acts_at_end(c)]
            if later:
                names = ", ".join(type(c).__name__ for c in later)
                raise ValueError(
                    f"pst-ds's RunEndCallback must come after {names}: pass callbacks=pst.callbacks(...) "
                    "as one list, in its order"
                )


def _acts_at_end(callback: Any) -> bool:
    return type(callback).__module__.startswith("pst_ds.") and "on_train_end" in type(callback).__dict__
