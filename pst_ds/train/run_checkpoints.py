"""A run's checkpoints: what trains, the base model's fingerprint, and the point to resume from.

A checkpoint leaves out the frozen backbone when the model's folder holds it (read back from
there, checked by its fingerprint), and the backbone a warm start rewrote (written once into
``<output_dir>/start``, io/start_weights.py). Beside DeepSpeed's files it holds the LR schedule,
each rank's RNG state (the Trainer's file) and the Trainer's state (``trainer_state.json``), so that
``Trainer.train(resume_from_checkpoint=<its folder>)`` goes on from the batch an unbroken run
would take next. checkpoint.py makes each save atomic and checked.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers.trainer import TRAINER_STATE_NAME

from ..config import ConfigError, ExperimentConfig, TrainConfig
from ..io.base_model import BaseTensors, fingerprint, fingerprint_change
from ..io.models import model_dir
from ..io.start_weights import START, read_start, write_start
from ..layers.base import DenseTeacher
from ..layers.inject import iter_pst_layers
from ..methods import Method
from . import checkpoint
from .distributed import from_rank_zero

SCHEDULE_FILE = "lr_schedule.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (it diverged, a save failed); the message is the whole explanation."""


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run goes on from: its folder, step and what else it recorded."""

    folder: Path
    step: int
    sparsity_profile: dict[str, float] | None


class RunCheckpoints:
    """Saves and finds the checkpoints of one run in ``<output_dir>/checkpoints``."""

    def __init__(
        self, config: ExperimentConfig, method: Method, output_dir: Path, ds_config: dict, world_size: int
    ) -> None:
        self.config, self.method, self.output_dir = config, method, output_dir
        self.root = output_dir / "checkpoints"
        self.ds_config, self.world_size = ds_config, world_size
        self.base: dict[str, Any] | None = None
        self.saved_step: int | None = None  # the step this run holds in a checkpoint (None: none yet)

    def record_base(self, model: nn.Module) -> None:
        """Where checkpoints read the frozen backbone back from, when they leave it out: the model's
        folder, its fingerprint and the dtype the run holds the weights in. None when checkpoints
        hold it: the method changes it, the model has no folder (model.source=random), the folder
        lacks a frozen tensor (a new task head), or train.save_frozen asks for it. Collective."""
        cfg = self.config
        if cfg.train.save_frozen or cfg.model.source == "random" or not self.method.frozen_backbone:
            return
        folder = model_dir(cfg.model)
        teachers = {id(m.weight) for m in model.modules() if isinstance(m, DenseTeacher)}  # the base's own
        frozen = [(n, p) for n, p in model.named_parameters() if not (p.requires_grad or id(p) in teachers)]
        files = BaseTensors(folder, model.base_model_prefix)
        if not frozen or any(files.key(name) is None for name, _ in frozen):
            return
        files = from_rank_zero(lambda: fingerprint(folder, functools.partial(print, flush=True)))
        self.base = {"path": str(folder), "dtype": str(frozen[0][1].dtype), "files": files}

    def manifest(self, profile: dict[str, float] | None) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the config and the world size; and the
        base model it builds on, when it leaves the frozen backbone out."""
        experiment = self.config.to_dict()
        for key in TrainConfig.RESUMABLE_CHANGES:
            experiment["train"].pop(key)
        return {
            "experiment": experiment,
            "world_size": self.world_size,
            "zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", 0),
            "base": self.base,
            "sparsity_profile": profile,  # found at the warm start; not found again
        }

    def resume_point(self, warn: Any) -> ResumePoint | None:
        """The newest sound complete checkpoint this run can go on from, checked against the
        config, the world size and the base model; None when there is none. Collective."""
        tag = checkpoint.newest_sound(self.root, shared=True, warn=warn)
        if tag is None:
            return None
        saved = checkpoint.read_manifest(self.root, tag)
        agreed_on, current = ("experiment", "world_size"), self.manifest(None)
        differences = checkpoint.config_differences(
            {k: saved[k] for k in agreed_on}, {k: current[k] for k in agreed_on}
        )
        if saved.get("zero_stage", current["zero_stage"]) != current["zero_stage"]:  # files differ by stage
            differences.append(
                f"it was saved under ZeRO stage {saved['zero_stage']}, this run's --ds_config uses stage "
                f"{current['zero_stage']}"
            )
        base, start = saved.get("base") or {}, (saved.get("base") or {}).get("start")
        if base:
            change = fingerprint_change(base["files"], model_dir(self.config.model))
            if change is None and start:
                change = fingerprint_change(start["files"], self.output_dir / start["folder"])
            if change is not None:
                differences.append(f"the base model it builds on has changed: {change}")
        if differences:
            raise ConfigError(
                f"cannot resume {self.root / tag}: "
                + "; ".join(differences)
                + " (set train.resume=never or another train.output_dir to start afresh)"
            )
        if start and self.base is not None:  # None: this run's checkpoints hold it (train.save_frozen)
            self.base = {**self.base, "start": start}
        return ResumePoint(self.root / tag, saved["step"], saved.get("sparsity_profile"))

    def load(self, engine: Any, point: ResumePoint, schedule: Any) -> None:
        """Restore the engine (factors, optimizer), the LR schedule and the rewritten backbone of
        a warm start that the checkpoint left out (the Trainer restores the RNG)."""
        checkpoint.load(engine, self.root, point.folder.name)
        schedule.load_state_dict(torch.load(point.folder / SCHEDULE_FILE, weights_only=False))
        saved = checkpoint.read_manifest(self.root, point.folder.name)
        start = (saved.get("base") or {}).get("start")
        if start:
            read_start(dict(iter_pst_layers(engine.module)), self.output_dir / start["folder"], _rank())
        self.saved_step = point.step
        if _rank() == 0:
            tqdm.write(f"pst-ds: resumed from {point.folder}")

    def write_start(self, model: nn.Module) -> None:
        """Write the backbone the warm start rewrote, once, as the run's start folder; the
        checkpoints' manifests refer to it by fingerprint (io/start_weights.py)."""
        if self.base is None or "start" in self.base or not self.method.writes_start_folder():
            return
        began, folder = time.time(), self.output_dir / START
        write_start(dict(iter_pst_layers(model)), folder, _rank())
        files = from_rank_zero(lambda: fingerprint(folder))  # rank 0 wrote the folder
        self.base = {**self.base, "start": {"folder": START, "files": files}}
        if _rank() == 0:
            tqdm.write(f"pst-ds: wrote the rewritten backbone to {folder} in {time.time() - began:.1f} s")

    def save(
        self,
        engine: Any,
        step: int,
        schedule: Any,
        state: Any,
        profile: dict | None,
        rng: Callable[[str], None],
    ) -> str:
        """Save step ``step`` (every rank); ``rng`` writes this rank's RNG state into the folder
        the way the Trainer reads it back. A failed write is a TrainingError naming what is intact."""
        began = time.time()

        def extra(directory: Path) -> None:  # inside the checkpoint, before it is complete
            rng(str(directory))  # the Trainer restores it once it has skipped to the data position
            if _rank() == 0:
                torch.save(schedule.state_dict(), directory / SCHEDULE_FILE)
                state.save_to_json(str(directory / TRAINER_STATE_NAME))  # Trainer.train reads it

        try:
            tag = checkpoint.save(
                engine,
                self.root,
                step,
                self.manifest(profile),
                self.config.train.keep_last,
                exclude_frozen=self.base is not None,
                extra=extra,
            )
        except checkpoint.SaveFailed as err:
            raise TrainingError(
                f"cannot save checkpoint {self.root / checkpoint.tag_for(step)} ({err}; "
                f"{checkpoint.free_mib(self.root):,.0f} MiB free there), so it was removed"
                f"{self.last_note() or '; no checkpoint is complete yet'}: free space or fix "
                "the folder's permissions, then run the same command"
                + (" to resume from it" if checkpoint.complete_tags(self.root) else "")
            ) from None
        self.saved_step = step
        if _rank() == 0:
            tqdm.write(f"pst-ds: step {step}: saved {tag} in {time.time() - began:.1f} s")
        return tag

    def last_note(self) -> str:
        """'; the last complete checkpoint is ..., intact' (empty when there is none)."""
        tags = checkpoint.complete_tags(self.root)
        return f"; the last complete checkpoint is {self.root / tags[0]}, intact" if tags else ""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
