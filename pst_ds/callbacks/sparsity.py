"""The sparsity controller in a Trainer's loop: the warm start (pst.init, with an OWL profile),
then the schedule after every optimizer step.

Before the first step the model is dense (the "before" evaluation sees the model as loaded); the
warm start runs as the first step begins, or at the end of a run without steps (a one-shot
method). Each optimizer step is followed by the next step's mask state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import ExperimentConfig
from ..io.data import calibration_batches
from ..layers.base import SparseLinear
from ..methods import Calibration, Method
from ..train.schedule import SparsityController

RUN_FILE = "pst_ds.json"  # written into each HF checkpoint folder: what save_pruned rebuilds from


class SparsityCallback(TrainerCallback):
    """Drives the sparsity controller of the layers ``prepare`` injected."""

    def __init__(
        self,
        config: ExperimentConfig,
        method: Method,
        layers: dict[str, SparseLinear],
        calibration: Dataset | None = None,
        profile: dict[str, float] | None = None,
    ) -> None:
        """``calibration``: the warm start's examples (None: the training set); ``profile``: a
        resumed run's sparsity profile (its warm start found it)."""
        self.config, self.method, self.layers = config, method, layers
        self.calibration = calibration
        # PSTTrainer sets it: a callback cannot see which Trainer calls it, and a Trainer with
        # its own loss trains without the teacher (told once, as training begins).
        self.loss_distils = False
        # Built here, with the layers: a model the method cannot start from is refused at once.
        self.controller = SparsityController(method, config.train.max_steps, layers)
        self.controller.profile = profile  # the controller owns it from here on
        self.warm_start_pending = False

    @property
    def profile(self) -> dict[str, float] | None:
        """Each layer's final sparsity where they differ (the controller's)."""
        return self.controller.profile

    def logged(self, args: TrainingArguments, state: Any, step: int) -> bool:
        """Whether step ``step + 1`` is logged (its first forward notes the mask, too)."""
        return (step + 1) % max(1, int(args.logging_steps)) == 0 or step + 1 == state.max_steps

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        weight = self.config.train.distill.weight
        if weight and self.method.trains and not self.loss_distils and state.is_world_process_zero:
            print(
                f"pst-ds: warning: train.distill.weight={weight} asks for the original model as a teacher, "
                "but this Trainer computes its own loss, so it trains without one (PSTTrainer distils; "
                "train.distill.weight=0 silences this)",
                flush=True,
            )
        self.controller.total_steps = max(state.max_steps, state.global_step)  # the Trainer's
        step = state.global_step
        if step > 0 and self.controller.profile is None:  # a Trainer resumed from its own checkpoint
            self.controller.profile = _saved_profile(args, step)
        fresh = step == 0
        self.warm_start_pending = fresh and (
            self.method.warm_start_method() is not None or self.method.holds_final_sparsity()
        )
        if self.warm_start_pending:
            self.controller.put_in_force(self.layers, 0.0)  # evaluated before: the dense model
        else:
            self.controller.apply(step, self.logged(args, state, step))
        self.model, self.loader = kwargs["model"], kwargs.get("train_dataloader")
        self.process_zero = state.is_world_process_zero

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.warm_start_pending:
            self.start(args, state)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # After the optimizer step (global_step counts it): fold its statistics, then the next
        # step's state.
        self.controller.end_step(state.global_step - 1)
        self.controller.apply(state.global_step, self.logged(args, state, state.global_step))

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.finish_start(args, state)  # a run without steps: the one-shot method is the whole run

    def finish_start(self, args: TrainingArguments, state: Any) -> None:
        """The warm start if it is still due (a run that took no step), else nothing."""
        if self.warm_start_pending:
            self.start(args, state)

    def start(self, args: TrainingArguments, state: Any) -> None:
        """The warm start (if the method has one), then step 0's state."""
        self.warm_start_pending = False
        if self.method.warm_start_method() is not None:
            self.warm_start(args)
        self.controller.apply(0, self.logged(args, state, 0))

    def warm_start(self, args: TrainingArguments) -> None:
        """The one-shot method of pst.init, on examples of the calibration set (the training set
        unless oneshot.calibration_files), drawn by train.seed."""
        config, controller, model = self.config, self.controller, self.model
        dataset = self.calibration if self.calibration is not None else self.loader.dataset
        collate = self.loader.collate_fn
        device = next(model.parameters()).device
        seed, batch_size = config.train.seed, args.per_device_train_batch_size
        batches = calibration_batches(dataset, config.oneshot.calibration_blocks, seed, batch_size, collate)
        count = sum(len(next(iter(batch.values()))) for batch in batches)
        began, was_training = time.time(), model.training
        model.eval()
        progress: Callable[[str], None] = (
            (lambda line: tqdm.write(f"pst-ds: {line}")) if self.process_zero else (lambda _: None)
        )
        controller.warm_start(
            Calibration(
                model,
                self.layers,
                [{k: v.to(device) for k, v in batch.items()} for batch in batches],
                lambda batch: model(**batch),
                controller.sparsity_at(0),
                controller.put_in_force,
                progress=progress,
            )
        )
        model.train(was_training)
        progress(
            f"{self.method.warm_start_method().name} pruned {len(self.layers)} layers to "
            f"{controller.sparsity_at(0):.3f} from {count} examples in {time.time() - began:.1f} s"
        )

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        if logs is not None and self.controller is not None and "loss" in logs:
            logs["sparsity"] = round(self.controller.global_sparsity(), 6)

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """An HF checkpoint folder gets what save_pruned and a resume need (the profile)."""
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                saved = {"experiment": self.config.to_dict(), "sparsity_profile": self.profile}
                (folder / RUN_FILE).write_text(json.dumps(saved, indent=1))


def _saved_profile(args: TrainingArguments, step: int) -> dict[str, float] | None:
    """The profile an HF checkpoint of step ``step`` recorded (a Trainer resumed from it)."""
    file = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / RUN_FILE
    return json.loads(file.read_text()).get("sparsity_profile") if file.is_file() else None
