"""One run per output folder: a lock held for the run's life.

Two runs started into one ``train.output_dir`` would interleave their checkpoints, metrics and
export. The first holds an advisory lock (``flock``) on ``<output_dir>/run.lock``, a file that
names its host and pid; a second run is refused with that name. The kernel drops the lock when
its process dies however it dies, so a lock file whose lock nobody holds is stale: it is taken
over, with a warning naming the run that left it. The callback takes it as training begins (a
script that must be refused before it loads the model calls ``acquire`` itself); the run's end
(callbacks/run_end.py) releases it, after the export and summary.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from ..config import ConfigError
from ..train.distributed import agreed

LOCK_FILE = "run.lock"


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.handle: IO[str] | None = None
        self.made_folder = False  # this run created the folder: an empty one is removed on release

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Hold the lock, or raise ConfigError naming the run that holds it."""
        self.made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115  (held open for the run's life)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = {"pid": "?", "host": "?", "started": "?", **_holder(handle)}
                handle.close()
                raise ConfigError(
                    f"train.output_dir {self.path.parent} is in use by the run of pid {holder['pid']} on "
                    f"{holder['host']} (started {holder['started']}): wait for it to end, stop it, or "
                    "choose another train.output_dir"
                ) from None
            except OSError as err:  # a file system without locks: run unguarded rather than not at all
                warn(f"cannot lock {self.path} ({err}); nothing stops a second run into this folder")
                handle.close()
                return
            if _same_file(handle, self.path):  # not unlinked by a holder releasing it meanwhile
                break
            handle.close()
        previous = _holder(handle)
        if previous:
            warn(
                f"taking over {self.path}, left by the run of pid {previous.get('pid')} on "
                f"{previous.get('host')}, which is no longer running"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(me) + "\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()
            self.handle = None
        if self.made_folder:  # a run refused before it wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def _holder(handle: IO[str]) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


class RunLockCallback(TrainerCallback):
    """Holds ``<folder>/run.lock``: rank 0 takes it; every rank learns of a refusal."""

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

    def close(self) -> None:
        """Release the lock (idempotent)."""
        self.lock.release()
        self.held = False

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.acquire(state.is_world_process_zero)
