"""Checkpoints: DeepSpeed's save/load made atomic, with a `latest` that only names complete ones.

Layout under ``<output_dir>/checkpoints``::

    step00000040/   DeepSpeed's files, rng_rank<r>.pt, and COMPLETE (written last)
    latest          the tag of the newest complete checkpoint (replaced atomically)

A save that dies part-way leaves a tag without COMPLETE; ``latest`` still names the
previous checkpoint, which is never deleted before a newer one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(root: Path, tag: str) -> bool:
    return (root / tag / COMPLETE).is_file()


def latest_tag(root: Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if is_complete(root, tag) else None


def read_manifest(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((root / tag / COMPLETE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, root: Path, step: int, manifest: dict[str, Any], keep_last: int) -> str:
    """Save on all ranks; mark complete and move ``latest`` only once every rank is done."""
    tag, rank = tag_for(step), dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(root / tag / COMPLETE, json.dumps({**manifest, "step": step}, indent=1))
        _write_atomic(root / LATEST, tag)
        _prune(root, keep=keep_last, newest=tag)
    dist.barrier()
    return tag


def _prune(root: Path, keep: int, newest: str) -> None:
    """Delete complete checkpoints beyond the newest ``keep`` and any leftover partial ones."""
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if is_complete(root, t)]
    stale = complete[:-keep] + [t for t in tags if t not in complete and t < newest]
    for tag in stale:
        shutil.rmtree(root / tag, ignore_errors=True)


def load(engine: Any, root: Path, tag: str) -> None:
    """Restore engine (factors, optimizer, LR schedule) and this rank's RNG state."""
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng = root / tag / f"rng_rank{dist.get_rank()}.pt"
    _restore_rng(torch.load(rng, weights_only=False))


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs
