"""The process group, and agreement between ranks on whether setup may go on.

A configuration error found on one rank must stop every rank the same way (one error line
from rank 0, exit status 2 everywhere), not leave the others waiting in a collective until
the launcher kills them with a traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import deepspeed
import torch.distributed as dist
from accelerate.state import AcceleratorState
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError

DIST_TIMEOUT = timedelta(minutes=30)
T = TypeVar("T")


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-process group for plain `python`."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        defaults = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
    skip_shm_build()
    deepspeed.init_distributed(timeout=DIST_TIMEOUT)


def leave_process_group() -> None:
    """End a good run: wait for every rank, then tear the process group down while all are
    alive. Left to interpreter exit, gloo's threads can be destroyed after a peer has gone and
    the process aborts ("terminate called without an active exception") after a run that
    succeeded. Afterwards another run in this process can open its own group."""
    import deepspeed.utils.groups as ds_groups

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    ds_groups._WORLD_GROUP = None  # DeepSpeed's cached clone of the world group goes with it
    # A Trainer's accelerate state, made for that group; and the flag its Accelerator set, which
    # would make the next Trainer in this process look for DeepSpeed's launcher (or MPI).
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def skip_shm_build() -> None:
    """On CPU, keep DeepSpeed's process group from JIT-compiling its shared-memory op, which
    only inference uses: the build needs a compiler, and a build killed half-way leaves a lock
    in ~/.cache/torch_extensions that every later start waits on for ever."""
    if on_cpu():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def agreed(work: Callable[[], T], run_here: bool = True) -> T | None:
    """Run ``work`` on this rank (if ``run_here``); if it raised ConfigError on any rank,
    raise that error on every rank (naming the rank when it is not rank 0).

    A collective: every rank must call it. Returns ``work``'s result, None where it did not run.
    """
    result, message = None, None
    if run_here:
        try:
            result = work()
        except ConfigError as err:
            message = str(err)
    problem = first_problem(message)
    if problem is not None:
        raise ConfigError(problem)
    return result


def first_problem(problem: str | None) -> str | None:
    """The first rank's ``problem`` (naming the rank when it is not 0), None if no rank has one.
    A collective: every rank must call it, with its own problem or None."""
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for rank, found in enumerate(problems):
        if found is not None:
            return found if rank == 0 else f"on rank {rank}: {found}"
    return None


def from_rank_zero(work: Callable[[], T]) -> T:
    """``work``'s result on rank 0, sent to every rank (a collective; only rank 0 runs it)."""
    result = [work() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def rank_zero_first(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0, then on the other ranks (which reuse what it cached); a
    ConfigError anywhere stops every rank, as in ``agreed``."""
    rank = dist.get_rank()
    first = agreed(work, run_here=rank == 0)
    rest = agreed(work, run_here=rank != 0)
    return first if rank == 0 else rest
