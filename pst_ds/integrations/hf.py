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
``callbacks=[pst.callback]`` and ``optimizer_cls_and_kwargs=pst.optimizer(args)``.

The TrainingArguments own the loop: batch sizes, learning rate and its schedule, steps, seed,
checkpoints. The pst-ds config owns the method: its sections pst, lora and oneshot, the side
learning rates (train.importance_lr, threshold_lr, head_lr, score_lr) and train.distill.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import ConfigError, ExperimentConfig, ModelConfig, PSTConfig
from ..experiment import experiment_config, experiment_from_dict, load_experiment
from ..io.data import calibration_batches
from ..io.export import (
    DEFAULT_SHARD_BYTES,
    export_deepspeed_checkpoint,
    no_progress_bars,
    stream_live,
    write_export,
)
from ..layers.inject import inject, iter_pst_layers
from ..methods import Calibration, Method, method_class
from ..train.distill import distilled
from ..train.distributed import skip_shm_build
from ..train.engine import load_ds_config
from ..train.optim import optimizer_groups
from ..train.schedule import SparsityController

__all__ = [
    "PSTCallback",
    "PSTRun",
    "PSTTrainer",
    "accelerator_config",
    "deepspeed_config",
    "prepare",
    "save_pruned",
]

RUN_FILE = "pst_ds.json"  # written into each HF checkpoint folder: what save_pruned rebuilds from
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
    """What ``prepare`` made of a model: the method, its layers and the callback that drives them."""

    config: ExperimentConfig
    method: Method
    model: nn.Module
    layer_names: list[str]

    def __post_init__(self) -> None:
        self.layers = dict(iter_pst_layers(self.model))
        self.callback = PSTCallback(self)
        self.loss_distils = False  # PSTTrainer's compute_loss distils; a Trainer's own loss does not

    def optimizer(self, args: TrainingArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """``Trainer(optimizer_cls_and_kwargs=...)``: AdamW over the trainable parameters, one group
        per job (the method's at args.learning_rate, the side rates from the pst-ds config)."""
        groups = optimizer_groups(self.model, self.method.pst, self.config.train, args.learning_rate)
        kwargs = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        return torch.optim.AdamW, {"params": groups, "weight_decay": args.weight_decay, **kwargs}

    def saved(self) -> dict[str, Any]:
        """What a checkpoint folder needs for ``save_pruned`` to rebuild the layers."""
        return {"experiment": self.config.to_dict()}


def prepare(
    model: PreTrainedModel, config: ExperimentConfig | PSTConfig | str, overrides: list[str] = ()
) -> PSTRun:
    """Inject the method's layers into ``model`` (after ``from_pretrained``; under ZeRO-3 the
    shapes come from the partitioned weights). ``config``: an experiment config, its YAML file
    (with ``key=value`` overrides) or a bare PST section."""
    if isinstance(config, PSTConfig):
        config = experiment_config(pst=config)
    elif not isinstance(config, ExperimentConfig):
        config = load_experiment(str(config), list(overrides))
    method = method_class(config.method)(config)
    if not method.trains:
        raise ConfigError(f"method={config.method} prunes once and does not train: run launch/train.py")
    if method.pst.sparsity_profile != "uniform":  # its profile would need the Trainer's resume to carry it
        raise ConfigError(
            f"pst.sparsity_profile={method.pst.sparsity_profile} runs in launch/train.py only, not yet "
            "through the HF Trainer"
        )
    return PSTRun(config, method, model, inject(model, method))


class PSTCallback(TrainerCallback):
    """Drives the sparsity controller: a warm start (pst.init) from the training data before the
    first step, the schedule after every optimizer step, and ``pst_ds.json`` in each checkpoint."""

    def __init__(self, run: PSTRun) -> None:
        self.run = run
        self.controller: SparsityController | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        run = self.run
        weight = run.config.train.distill.weight
        if weight and not run.loss_distils and state.is_world_process_zero:
            print(
                f"pst-ds: warning: train.distill.weight={weight} asks for the original model as a teacher, "
                "but this Trainer computes its own loss, so it trains without one (PSTTrainer distils; "
                "train.distill.weight=0 silences this)",
                flush=True,
            )
        self.controller = SparsityController(run.method, state.max_steps, run.layers)
        if state.global_step == 0 and run.method.warm_start_method() is not None:
            self._warm_start(args, state, kwargs["model"], kwargs["train_dataloader"])
        self.controller.apply(state.global_step)

    def _warm_start(self, args: TrainingArguments, state: Any, model: nn.Module, loader: Any) -> None:
        """The one-shot method of pst.init, on examples of the training set drawn as pst-ds's own
        loop draws them (the same seed, so both start from the same mask)."""
        run, controller = self.run, self.controller
        controller.put_in_force(run.layers, 0.0)  # calibration sees the dense model
        device = next(model.parameters()).device
        batches = calibration_batches(
            loader.dataset,
            run.config.oneshot.calibration_blocks,
            run.config.train.seed,
            args.per_device_train_batch_size,
            loader.collate_fn,
        )
        was_training = model.training
        model.eval()
        controller.warm_start(
            Calibration(
                model,
                run.layers,
                [{k: v.to(device) for k, v in batch.items()} for batch in batches],
                lambda batch: model(**batch),
                controller.sparsity_at(0),
                controller.put_in_force,
                progress=lambda line: (
                    print(f"pst-ds: {line}", flush=True) if state.is_world_process_zero else None
                ),
            )
        )
        model.train(was_training)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # After the optimizer step (global_step counts it): the schedule moves, as in pst-ds's loop.
        self.controller.end_step(state.global_step - 1)
        self.controller.apply(state.global_step)

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        if logs is not None and self.controller is not None and "loss" in logs:
            logs["sparsity"] = round(self.controller.global_sparsity(), 6)

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                (folder / RUN_FILE).write_text(json.dumps(self.run.saved(), indent=1))


class PSTTrainer(Trainer):
    """``transformers.Trainer`` for a model that ``prepare`` injected: the PST callback, the
    optimizer's groups and, with train.distill, the distillation loss (the teacher is the frozen
    dense backbone; the loss is averaged per micro-batch, as pst-ds's own loop does)."""

    def __init__(self, pst: PSTRun, *args: Any, **kwargs: Any) -> None:
        self.pst = pst
        pst.loss_distils = True
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), pst.callback]
        super().__init__(*args, **kwargs)
        if pst.config.train.distill.weight:
            self.model_accepts_loss_kwargs = False  # the Trainer averages our per-micro-batch loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = self.pst.optimizer(self.args)
        return super().create_optimizer(model)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        distill = self.pst.config.train.distill
        if not distill.weight:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = distilled(model, inputs, distill)
        return (loss, outputs) if return_outputs else loss


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
        run = model_or_checkpoint
        if isinstance(model_or_checkpoint, Trainer):
            tokenizer = tokenizer or model_or_checkpoint.processing_class
            callbacks = model_or_checkpoint.callback_handler.callbacks
            run = next((c.run for c in callbacks if isinstance(c, PSTCallback)), None)
            if run is None:
                raise ConfigError(
                    "save_pruned: this Trainer has no PSTCallback (pass callbacks=[pst.callback])"
                )
        write = not dist.is_initialized() or dist.get_rank() == 0
        items = stream_live(run.model, write)
        report = None
        if write:
            origin = {"source": "live model"}
            report = write_export(
                items, run.model, run.method, run.layer_names, tokenizer, out_dir, origin, max_shard_bytes
            )
        else:
            for _ in items:  # the gathers are collective: every rank walks the model
                pass
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
