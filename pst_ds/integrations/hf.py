"""PST inside a user's own ``transformers.Trainer`` script, under DeepSpeed ZeRO-3 or without it.

    args = TrainingArguments(..., deepspeed=deepspeed_config("configs/zero3.json"),  # before the model
                             accelerator_config=accelerator_config())
    model = AutoModelForCausalLM.from_pretrained(path)                # ZeRO-3: built partitioned
    pst = prepare(model, "configs/experiments/default.yaml")          # 1: inject the method's layers
    trainer = PSTTrainer(pst, model=model, args=args, train_dataset=...)  # 2: a Trainer that drives it
    trainer.train()
    save_pruned(trainer, f"{args.output_dir}/pruned")                 # 3: the pruned plain HF folder

``PSTTrainer`` is ``Trainer`` with three additions: the sparsity callback, the optimizer's
parameter groups (each job at its own learning rate) and distillation in ``compute_loss``. A
script that must keep its own Trainer class (Axolotl, TRL) adds the same with
``callbacks=[pst.callback]`` and ``optimizer_cls_and_kwargs=pst.optimizer(args)``; and every
other run feature (the run lock, preemption, before/after perplexities, metrics.jsonl and
summary.json, the export) with ``callbacks=pst.callbacks(args.output_dir, evaluate=...)``.

The TrainingArguments own the loop: batch sizes, learning rate and its schedule, steps, seed,
checkpoints. The pst-ds config owns the method: its sections pst, lora and oneshot, the side
learning rates (train.importance_lr, threshold_lr, head_lr, score_lr) and train.distill.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from accelerate import PartialState
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..callbacks.export import ExportCallback, export_live
from ..callbacks.preemption import PreemptionCallback
from ..callbacks.records import RunRecordsCallback, layer_failures_named
from ..callbacks.run_end import RunEndCallback, check_order
from ..callbacks.run_lock import RunLockCallback
from ..callbacks.sparsity import RUN_FILE, SparsityCallback
from ..config import ConfigError, ExperimentConfig, ModelConfig, PSTConfig
from ..experiment import experiment_config, experiment_from_dict, load_experiment
from ..io.export import DEFAULT_SHARD_BYTES, export_deepspeed_checkpoint, no_progress_bars
from ..layers.inject import inject, iter_pst_layers
from ..methods import Method, method_class
from ..train.distill import distilled
from ..train.distributed import skip_shm_build
from ..train.engine import load_ds_config
from ..train.optim import optimizer_groups
from ..train.run_checkpoints import ResumePoint, RunCheckpoints

__all__ = [
    "PSTRun",
    "PSTTrainer",
    "SparsityCallback",
    "accelerator_config",
    "deepspeed_config",
    "prepare",
    "save_pruned",
]

# What a Trainer fills in a DeepSpeed config from its TrainingArguments (pst-ds's own configs
# leave them out: launch/train.py fills them from the experiment config). Not train_batch_size:
# DeepSpeed derives it, and TrainingArguments would fill it before it knows the world size.
TRAINER_FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def accelerator_config() -> dict[str, Any]:
    """``TrainingArguments(accelerator_config=...)`` for a DeepSpeed job. On CPU ranks accelerate
    (1.15) finds no accelerator backend and counts one process, so every rank would train on the
    whole dataset: this makes the process state it then reuses, on gloo. Elsewhere: {}."""
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return {}
    skip_shm_build()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments sets it for its own state
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}


def deepspeed_config(path: str | dict[str, Any]) -> dict[str, Any]:
    """A pst-ds DeepSpeed config (configs/*.json) for ``TrainingArguments(deepspeed=...)``: the
    batch sizes the Trainer fills in left as "auto"."""
    config = dict(load_ds_config(path) if isinstance(path, str) else path)
    for key in TRAINER_FILLED:
        config.setdefault(key, "auto")
    return config


@dataclasses.dataclass
class PSTRun:
    """What ``prepare`` made of a model: the method, its layers and the callbacks that drive them."""

    config: ExperimentConfig
    method: Method
    model: nn.Module
    layer_names: list[str]
    calibration: Dataset | None = None  # the warm start's examples (None: the training set)
    profile: dict[str, float] | None = None  # a resumed run's sparsity profile

    def __post_init__(self) -> None:
        self.layers = dict(iter_pst_layers(self.model))
        self.callback = SparsityCallback(
            self.config, self.method, self.layers, self.calibration, self.profile
        )

    def callbacks(
        self,
        output_dir: str | Path,
        evaluate: dict[str, Dataset] | None = None,
        export: bool = True,
        tokenizer: Any = None,
    ) -> list[TrainerCallback]:
        """Every run feature as a Trainer callback, in the order they must run (run_callbacks):
        the run lock on ``output_dir``, preemption (save and stop), the sparsity controller, the
        export to ``<output_dir>/export`` (``export``), the run's records (``evaluate``: named sets
        whose metric is taken before and after training; the first is the validation set) and
        the run's end, which releases the lock and the signal handlers after all of them."""
        folder = Path(output_dir) / "export"
        exported = ExportCallback(folder, self.method, self.layer_names, tokenizer) if export else None
        texts = _validation_first(evaluate or {})
        records = RunRecordsCallback(
            output_dir, self.method, texts, self.config.model.task, self.callback, exported
        )
        return run_callbacks(
            RunLockCallback(output_dir), PreemptionCallback(), self.callback, exported, records
        )

    def optimizer(self, args: TrainingArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """``Trainer(optimizer_cls_and_kwargs=...)``: AdamW over the trainable parameters, one group
        per job (the method's at args.learning_rate, the side rates from the pst-ds config)."""
        groups = optimizer_groups(self.model, self.method.pst, self.config.train, args.learning_rate)
        kwargs = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        return torch.optim.AdamW, {"params": groups, "weight_decay": args.weight_decay, **kwargs}


def run_callbacks(
    lock: RunLockCallback,
    preemption: PreemptionCallback,
    sparsity: SparsityCallback,
    export: ExportCallback | None,
    records: RunRecordsCallback,
) -> list[TrainerCallback]:
    """A run's callbacks in the one order they must run: the Trainer calls each event in list
    order, so the lock is taken before anything else begins, the export precedes the final
    evaluation and summary.json, and the run's end (last) releases the lock and the signal
    handlers after all of them."""
    end = RunEndCallback(lock, preemption, records)
    return [lock, preemption, sparsity, *([export] if export else []), records, end]


def _validation_first(texts: dict[str, Dataset]) -> dict[str, Dataset]:
    if not texts or "validation" in texts:
        return texts
    first, *rest = texts
    return {"validation": texts[first], **{name: texts[name] for name in rest}}


def prepare(
    model: PreTrainedModel,
    config: ExperimentConfig | PSTConfig | str,
    overrides: list[str] = (),
    calibration: Dataset | None = None,
) -> PSTRun:
    """Inject the method's layers into ``model`` (after ``from_pretrained``; under ZeRO-3 the
    shapes come from the partitioned weights). ``config``: an experiment config, its YAML file
    (with ``key=value`` overrides) or a bare PST section. ``calibration``: the warm start's
    examples (default: the training set)."""
    if isinstance(config, PSTConfig):
        config = experiment_config(pst=config)
    elif not isinstance(config, ExperimentConfig):
        config = load_experiment(str(config), list(overrides))
    method = method_class(config.method)(config)
    if not method.trains:
        raise ConfigError(f"method={config.method} prunes once and does not train: run launch/train.py")
    return PSTRun(config, method, model, inject(model, method), calibration)


# The Trainer's private methods PSTTrainer overrides, with the parameters it relies on; checked at
# construction, since an override of a method another transformers release renamed is never
# called (docs/architecture.md says why each one is overridden).
OVERRIDDEN = {
    "_prepare_for_training": ("max_steps", "train_dataloader", "resume_from_checkpoint"),
    "_save_checkpoint": ("model", "trial"),
    "_finalize_training": ("trial", "num_train_samples", "start_time"),
}
SUPPORTED_TRANSFORMERS = ">=5.22.2,<5.26"  # setup.py's range, both ends tested (a test keeps them one)


def check_trainer_internals(trainer_class: type = Trainer) -> None:
    """ConfigError unless ``trainer_class`` has each method PSTTrainer overrides, with its parameters."""
    for name, expected in OVERRIDDEN.items():
        method = getattr(trainer_class, name, None)
        found = None if method is None else tuple(inspect.signature(method).parameters)[1:]
        if found != expected:
            has = "no such method" if found is None else f"its parameters are {found}"
            raise ConfigError(
                f"PSTTrainer needs transformers{SUPPORTED_TRANSFORMERS}: this is {transformers.__version__}, "
                f"whose Trainer.{name} differs ({has}); install a supported release, or use a plain "
                "Trainer with callbacks=pst.callbacks(...)"
            )


class PSTTrainer(Trainer):
    """``transformers.Trainer`` for a model that ``prepare`` injected: the sparsity callback, the
    optimizer's groups and, with train.distill, the distillation loss (the teacher is the frozen
    dense backbone). The loss is the Trainer's: the mean over the labelled tokens of the whole
    accumulated batch (``num_items_in_batch``), the distillation term counted the same way.

    With ``checkpoints`` (launch/train.py), its checkpoints hold what trains and resume exactly
    (train/run_checkpoints.py); without, they are the Trainer's own."""

    def __init__(
        self,
        pst: PSTRun,
        *args: Any,
        checkpoints: RunCheckpoints | None = None,
        resume_point: ResumePoint | None = None,
        **kwargs: Any,
    ) -> None:
        check_trainer_internals(Trainer)
        self.pst, self.run_checkpoints, self.resume_point = pst, checkpoints, resume_point
        self.builds_optimizer = kwargs.get("optimizer_cls_and_kwargs") is None
        pst.callback.loss_distils = True
        callbacks = list(kwargs.get("callbacks") or [])
        try:
            check_order(callbacks)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        kwargs["callbacks"] = callbacks if pst.callback in callbacks else [*callbacks, pst.callback]
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.builds_optimizer:  # afresh: the Trainer pops its "params"
            self.optimizer_cls_and_kwargs = self.pst.optimizer(self.args)
        return super().create_optimizer(model)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        distill = self.pst.config.train.distill
        if not distill.weight:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        # As Trainer.compute_loss: per token of the accumulated batch when the model takes
        # num_items_in_batch, and times the ranks when the count is over all of them (DeepSpeed
        # averages the ranks' gradients).
        num_items = kwargs.get("num_items_in_batch") if self.model_accepts_loss_kwargs else None
        loss, outputs = distilled(model, inputs, distill, num_items)
        if num_items is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        note = self.run_checkpoints.last_note() if self.run_checkpoints is not None else ""
        with layer_failures_named(f"step {self.state.global_step + 1}", note):
            return super().training_step(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        """Train from the start, or from the constructor's ``resume_point`` (lean checkpoints)."""
        if self.resume_point is not None:
            resume_from_checkpoint = str(self.resume_point.folder)
            if self.resume_point.step >= self.args.max_steps:  # already trained: evaluate, export
                # No step to take: the Trainer has no public way to end a checkpoint through
                # on_train_end without one. Its own copy of the arguments, the caller's untouched.
                self.args = copy.copy(self.args)
                self.args.max_steps, self.args.num_train_epochs = 0, 0
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except BaseException:  # the Trainer skips on_train_end: the run's end comes down here
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, RunEndCallback):
                    callback.close()
            raise

    def _prepare_for_training(
        self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any
    ) -> Any:
        if self.run_checkpoints is None:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, loader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if self.resume_point is not None:  # the lean checkpoint: ours to load, not the Trainer's
            self.run_checkpoints.load(self.model_wrapped, self.resume_point, self.lr_scheduler)
        return model, loader

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.run_checkpoints is None:
            return super()._save_checkpoint(model, trial)
        self.run_checkpoints.write_start(self.model)
        for callback in [*self.callback_handler.callbacks, self.control]:  # as the Trainer's own save
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks[type(callback).__name__] = callback.state()
        profile = self.pst.callback.profile
        self.run_checkpoints.save(
            self.model_wrapped,
            self.state.global_step,
            self.lr_scheduler,
            self.state,
            profile,
            self._save_rng_state,
        )

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        if self.run_checkpoints is not None:  # every run ends with what it holds saved
            self.pst.callback.finish_start(self.args, self.state)  # a run without steps: its start
            if self.run_checkpoints.saved_step != self.state.global_step:
                self._save_checkpoint(self.model, None)
        return super()._finalize_training(*args, **kwargs)


def save_pruned(
    model_or_checkpoint: PSTRun | Trainer | str | Path,
    out_dir: str | Path,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any] | None:
    """Write the pruned model as a plain HF folder (weights M * (W + beta U V) under the original
    names, zeros in place; each mask checked against its pattern; ``pst_sparsity.json``), as
    launch/export.py does.

    From the live model (the ``PSTRun`` that ``prepare`` returned, or a Trainer that holds its
    callback), at the end of training: collective, call it on every rank; rank 0 writes. From an
    HF checkpoint folder (``checkpoint-N`` of a DeepSpeed run): on one process, streamed.
    Returns the report (None on the other ranks)."""
    out_dir = Path(out_dir)
    with no_progress_bars():
        if isinstance(model_or_checkpoint, (str, Path)):
            return _from_checkpoint(Path(model_or_checkpoint), out_dir, max_shard_bytes)
        if isinstance(model_or_checkpoint, Trainer):
            trainer = model_or_checkpoint
            tokenizer = tokenizer or trainer.processing_class
            found = [c for c in trainer.callback_handler.callbacks if isinstance(c, SparsityCallback)]
            if not found:
                raise ConfigError(
                    "save_pruned: this Trainer has no pst-ds SparsityCallback "
                    "(pass callbacks=pst.callbacks(...))"
                )
            model, method, layer_names = trainer.model, found[0].method, list(found[0].layers)
        else:
            run = model_or_checkpoint
            model, method, layer_names = run.model, run.method, run.layer_names
        origin = {"source": "live model"}
        report = export_live(model, method, layer_names, tokenizer, out_dir, origin, max_shard_bytes)
        if dist.is_initialized():
            dist.barrier()
        return report


def _from_checkpoint(folder: Path, out_dir: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Export an HF Trainer checkpoint folder: the DeepSpeed files under it, the model's
    structure from its config.json, the method from the pst_ds.json the callback wrote."""
    if not (folder / RUN_FILE).is_file():
        raise ConfigError(f"{folder} holds no {RUN_FILE}: it is not a checkpoint of a PSTCallback run")
    latest = folder / "latest"
    if not latest.is_file():
        raise ConfigError(f"{folder} holds no DeepSpeed checkpoint ('latest'): use save_pruned(trainer)")
    experiment = json.loads((folder / RUN_FILE).read_text())["experiment"]
    # The structure from the checkpoint's own config.json (the Trainer saves it), not the source.
    experiment["model"] = dataclasses.asdict(ModelConfig(source="path", path=str(folder.resolve())))
    method = method_class(experiment["method"])(experiment_from_dict(experiment))
    tokenizer = (
        AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    )
    tag = latest.read_text().strip()
    origin = {"checkpoint": str(folder / tag), "step": int(tag.removeprefix("global_step"))}
    return export_deepspeed_checkpoint(
        folder / tag, method, out_dir, origin, tokenizer, None, max_shard_bytes
    )
