"""Preemption: a scheduler's notice turned into a complete checkpoint and a documented exit.

Two ways a cluster ends a job, both noticed after the current optimizer step:

- a signal: SIGTERM (what a scheduler, ``timeout`` or a container runtime sends) or SIGUSR1
  (SLURM's warning before a time limit, ``--signal=USR1@600``), to a rank or to the whole
  process group. DeepSpeed's per-node launcher relays a SIGTERM it receives to the ranks, so a
  group signal arrives twice within milliseconds: every signal after the first is the same
  notice. (Ctrl-C, SIGINT, still stops at once.)
- the end of the ``deepspeed`` command alone: its runner relays no signal on one node (only
  pdsh's runner does) and dies, leaving the per-node launcher and the ranks behind. Each rank
  watches its launcher's parent: when the runner that started it is gone, that is the notice.

After every optimizer step the ranks agree whether any of them had a notice (one all-reduce of
one number); if so, the Trainer saves (``control.should_save``) and stops, and the script exits
with ``PREEMPTED_EXIT``. The same command resumes. The handlers stay installed through the export
and the final evaluation (callbacks/run_end.py removes them, restoring the ones before): a signal
there lets the end finish what it writes, then the run exits as preempted too, and the same
command ends it again. The handler only records the signal: printing from a handler can fail
mid-write.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run stopped cleanly and can be continued
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_MODULE = b"deepspeed.launcher.launch"  # DeepSpeed's per-node launcher, the ranks' parent


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (Linux /proc), or None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # the name in parentheses may hold spaces


def launcher_runner() -> tuple[int, int] | None:
    """(the per-node launcher's pid, its parent's: the ``deepspeed`` runner) when this process
    is a rank DeepSpeed's launcher started; None otherwise."""
    launcher = os.getppid()
    try:
        command = Path(f"/proc/{launcher}/cmdline").read_bytes()
    except OSError:
        return None
    runner = parent_of(launcher)
    return (launcher, runner) if LAUNCHER_MODULE in command and runner is not None else None


class PreemptionNotice:
    """Records the first SIGTERM / SIGUSR1, or the end of the ``deepspeed`` command, as the
    reason to save and stop (``received``: said in words)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._signal: int | None = None
        self._announced = False
        self._watched = launcher_runner()
        self._before = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = signum

    def pending(self) -> bool:
        """True once a notice has come to this rank (checked after every step); says so once."""
        if self.received is None and self._signal is not None:
            self.received = signal.Signals(self._signal).name
        if self.received is None and self._watched is not None:
            launcher, runner = self._watched
            if parent_of(launcher) != runner:
                self.received = f"the end of the deepspeed command (its runner, pid {runner}, is gone)"
        if self.received is not None and not self._announced:
            self._announced = True
            tqdm.write(f"pst-ds: {self.received}: finishing this step, then saving a checkpoint")
        return self.received is not None

    def uninstall(self) -> None:
        """Put back the handlers that were there before (idempotent)."""
        for signum, handler in self._before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._before = {}


class PreemptionCallback(TrainerCallback):
    def __init__(self) -> None:
        self.notice: PreemptionNotice | None = None
        self.stopped: str | None = None  # what stopped the run, once it did (None: it was not)
        self.stopped_at: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.notice = PreemptionNotice()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._any_rank_noticed() and state.global_step < state.max_steps:
            self._stop(state)
            control.should_save = True
            control.should_training_stop = True

    def note_signal_after_training(self, state: Any) -> None:
        """After the export and the final evaluation (every rank): a notice that came during
        them stops the run as preempted too; the same command then ends it again."""
        if self.notice is not None and self.stopped is None and self._any_rank_noticed():
            self._stop(state)

    def close(self) -> None:
        """Restore the handlers that were there before (idempotent)."""
        if self.notice is not None:
            self.notice.uninstall()

    def _stop(self, state: Any) -> None:
        self.stopped = self.notice.received or "a signal on another rank"
        self.stopped_at = state.global_step

    def _any_rank_noticed(self) -> bool:
        signalled = float(self.notice.pending())
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signalled], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag)
            signalled = float(flag.item())
        return signalled > 0
