"""Checkpoints: DeepSpeed's save/load made atomic, with a `latest` that only names complete ones.

Layout under ``<output_dir>/checkpoints``::

    step00000040/   DeepSpeed's files, the loop's own (each rank's RNG, ...), COMPLETE (last)
    latest          the tag of the newest complete checkpoint (replaced atomically)

A save that dies part-way leaves a tag without COMPLETE; ``latest`` still names the
previous checkpoint, which is never deleted before a newer one is complete. COMPLETE
records the size and sha256 of every file, so a checkpoint damaged after it was written
(a truncated copy, a full disk, a flipped bit) is detected before it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..config import ConfigError
from ..io.base_model import file_sha256
from .distributed import first_problem

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


def complete_tags(root: Path) -> list[str]:
    """Every complete checkpoint's tag, newest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")]
    return sorted((t for t in tags if is_complete(root, t)), reverse=True)


def read_manifest(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((root / tag / COMPLETE).read_text())


def _file_digests(directory: Path, names: list[str], shared: bool) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named file; with ``shared``, the ranks split the hashing (a
    collective: every rank must call it)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared else (0, 1)
    mine = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
        for name in names[rank::world]
    }
    if world == 1:
        return mine
    parts: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    return {name: digest for part in parts for name, digest in part.items()}


def damage(root: Path, tag: str, shared: bool = False) -> str | None:
    """What is wrong with complete checkpoint ``tag`` (naming the file), or None if every file
    COMPLETE recorded is there with its size and checksum. ``shared``: as in _file_digests."""
    directory = root / tag
    try:
        recorded = read_manifest(root, tag).get("files")
    except (OSError, json.JSONDecodeError) as err:
        return f"{directory / COMPLETE} cannot be read ({err})"
    if recorded is None:  # written before checksums were recorded: nothing to check against
        return None
    for name, saved in sorted(recorded.items()):  # sizes first: cheap, and they catch truncation
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != saved["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {saved['bytes']} when saved"
    digests = _file_digests(directory, sorted(recorded), shared)
    for name, saved in sorted(recorded.items()):
        if digests[name]["sha256"] != saved["sha256"]:
            return f"{directory / name} differs from the checksum recorded when it was saved"
    return None


def newest_sound(root: Path, shared: bool = False, warn: Callable[[str], None] = print) -> str | None:
    """The newest complete checkpoint that is not damaged, or None when there is no complete one.

    Each damaged one is reported through ``warn`` and the previous one tried; if every complete
    checkpoint is damaged, ConfigError names the first problem. ``shared``: as in _file_digests.
    """
    tags = complete_tags(root)
    problems = []
    for tag in tags:
        problem = damage(root, tag, shared)
        if problem is None:
            if problems:
                warn(f"resuming from the older {root / tag} instead")
            return tag
        problems.append(problem)
        warn(f"checkpoint {root / tag} is damaged: {problem}")
    if problems:
        raise ConfigError(
            f"every checkpoint under {root} is damaged (the newest: {problems[0]}); "
            "set train.resume=never or another train.output_dir to start afresh"
        )
    return None


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class _RecordedWrites:
    """DeepSpeed's checkpoint engine with its writes' failures recorded instead of raised: a
    rank whose disk is full goes on through every collective of the save like the others, writing
    nothing more, and the ranks then agree on the failure (no count of DeepSpeed's barriers to
    match)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.problem = inner, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _recorded(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.problem is not None:
            return
        try:
            write(*args, **kwargs)
        except WRITE_ERRORS as err:
            self.problem = _described(err)

    def save(self, state_dict: Any, path: str) -> None:
        self._recorded(self.inner.save, state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._recorded(self.inner.makedirs, path, exist_ok=exist_ok)


class SaveFailed(Exception):
    """A checkpoint could not be written (no space, no permission); the partial one is removed."""


# What a full disk or a read-only folder raises: torch.save reports a failed write as a RuntimeError.
WRITE_ERRORS = (OSError, RuntimeError)


def save(
    engine: Any,
    root: Path,
    step: int,
    manifest: dict[str, Any],
    keep_last: int,
    exclude_frozen: bool,
    extra: Callable[[Path], None] | None = None,
) -> str:
    """Save on all ranks; mark complete and move ``latest`` only once every rank is done.
    ``exclude_frozen``: leave out the parameters that do not train (read back from the base).
    ``extra``: each rank writes more files into the checkpoint's folder (the loop's own state:
    its RNG, its schedule).

    A write that fails on any rank raises SaveFailed on every rank, after rank 0 removed the
    partial checkpoint: ``latest`` still names the previous one, untouched."""
    tag, rank = tag_for(step), dist.get_rank()
    directory = root / tag
    if rank == 0:  # saving over an earlier save of this step: it stops counting as complete first
        (directory / COMPLETE).unlink(missing_ok=True)
    dist.barrier()
    writes = _RecordedWrites(engine.checkpoint_engine)
    engine.checkpoint_engine = writes
    try:
        engine.save_checkpoint(
            str(root), tag=tag, save_latest=False, exclude_frozen_parameters=exclude_frozen
        )
    finally:
        engine.checkpoint_engine = writes.inner
    problem = writes.problem
    if problem is None and extra is not None:
        try:
            extra(directory)
        except WRITE_ERRORS as err:
            problem = _described(err)
    _stop_everywhere(problem, directory)  # every rank's files are on disk, or none goes on
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    files = _file_digests(directory, names, shared=True)
    problem = None
    if rank == 0:
        try:
            _write_atomic(
                directory / COMPLETE, json.dumps({**manifest, "step": step, "files": files}, indent=1)
            )
            _write_atomic(root / LATEST, tag)
            _prune(root, keep=keep_last, newest=tag)
        except OSError as err:
            problem = _described(err)
    _stop_everywhere(problem, directory)
    return tag


def free_mib(path: Path) -> float:
    """Free space on the file system that holds ``path`` (or would: its first existing parent)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free / 2**20


def _described(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _stop_everywhere(problem: str | None, directory: Path) -> None:
    """Raise SaveFailed on every rank if any rank had a ``problem`` (a collective)."""
    first = first_problem(problem)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    raise SaveFailed(first)


def _prune(root: Path, keep: int, newest: str) -> None:
    """Delete complete checkpoints beyond the newest ``keep`` and any leftover partial ones."""
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if is_complete(root, t)]
    stale = complete[:-keep] + [t for t in tags if t not in complete and t < newest]
    for tag in stale:
        shutil.rmtree(root / tag, ignore_errors=True)


def load(engine: Any, root: Path, tag: str) -> None:
    """Restore the engine (factors, optimizer). The frozen parameters a checkpoint may leave out
    keep the values the model was loaded with."""
    path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=False,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")


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
