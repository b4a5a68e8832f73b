"""Preemption: a scheduler's notice turned into a complete checkpoint and a documented exit.

SIGTERM (what a scheduler sends before it takes the nodes back) or SIGUSR1 (SLURM's warning
before a time limit, ``--signal=USR1@600``) on any rank asks the run to stop after the current
optimizer step: the ranks learn of it with the loss they already average after every step,
save a checkpoint together and exit with ``PREEMPTED_EXIT``. The same command resumes. A second
signal ends the process at once, as if nothing were installed.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run stopped cleanly and can be continued
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a signal; the message says how to go on."""


class PreemptionNotice:
    """Notes SIGTERM / SIGUSR1 (``received``: the signal's name) instead of dying of the first."""

    def __init__(self) -> None:
        self.received: str | None = None
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second: stop now, with the signal's own status
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        print(
            f"pst-ds: {self.received} received: finishing this optimizer step, then saving a checkpoint "
            "(a second signal stops at once)",
            flush=True,
        )

    def uninstall(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
