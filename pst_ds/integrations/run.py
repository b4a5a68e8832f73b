"""A pst-ds run from its experiment config: the PSTTrainer that launch/train.py trains.

``build_run`` takes the output folder's run lock first, then loads the data, prints the memory
model, builds the model with the method's layers under the DeepSpeed config and finds the
checkpoint to resume from, before it writes anything else: a bad configuration fails without
leaving a half-written run behind (nor the folder, if the run created it). Everything the run
does beyond the Trainer's loop is a callback (pst_ds/callbacks/).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ..callbacks.export import ExportCallback
from ..callbacks.preemption import PreemptionCallback
from ..callbacks.records import RunRecordsCallback
from ..callbacks.run_end import RunEndCallback
from ..callbacks.run_lock import RunLockCallback
from ..config import ConfigError, ExperimentConfig
from ..io.data import collate_for, load_calibration_blocks, load_eval_texts, load_splits
from ..io.models import enable_gradient_checkpointing, load_tokenizer
from ..layers.inject import build_model
from ..methods import method_class
from ..paths import check_files
from ..train.distributed import agreed, init_distributed, on_cpu, rank_zero_first
from ..train.engine import peak_memory_bytes, prepare_ds_config, resolve_output_dir
from ..train.memory import MemoryEstimate, estimate
from ..train.run_checkpoints import RunCheckpoints
from .hf import PSTRun, PSTTrainer, accelerator_config, run_callbacks


@dataclasses.dataclass
class Run:
    """A built run: its Trainer and the callbacks whose outcome the script reports."""

    trainer: PSTTrainer
    lock: RunLockCallback
    preemption: PreemptionCallback
    export: ExportCallback | None
    records: RunRecordsCallback
    end: RunEndCallback
    checkpoints: RunCheckpoints

    def train(self) -> dict[str, Any] | None:
        """Train (or resume) to train.max_steps, evaluate, export if asked; release the folder.
        Returns the run's summary (None when a preemption stopped it: ``preemption.stopped``)."""
        try:
            self.trainer.train()
        finally:
            self.end.close()  # a ConfigError before training began skips the Trainer's own end
        return self.records.summary

    @property
    def config(self) -> ExperimentConfig:
        return self.trainer.pst.config

    @property
    def layers(self) -> dict[str, Any]:
        """The pruned layers by name."""
        return self.trainer.pst.layers

    @property
    def controller(self) -> Any:
        return self.trainer.pst.callback.controller

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine (once training has begun)."""
        return self.trainer.model_wrapped


def build_run(config: ExperimentConfig, ds_config: dict[str, Any]) -> Run:
    """Lock the folder, then build the whole run (every rank). A ConfigError leaves no trace."""
    method = method_class(config.method)(config)
    ds_config = prepare_ds_config(ds_config, config.train)
    output_dir = resolve_output_dir(config.train.output_dir)
    check_files(config)  # before the process group: a missing file stops every rank alike
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # First: another live run may be writing this folder, and a second one must not pay the
    # whole load before it is refused.
    lock = RunLockCallback(output_dir)
    lock.acquire(rank == 0)
    try:
        return _build(config, method, ds_config, output_dir, lock, rank, world_size)
    except BaseException:
        lock.close()  # a refused run leaves the folder to the next one
        raise


def _build(
    config: ExperimentConfig,
    method: Any,
    ds_config: dict[str, Any],
    output_dir: Path,
    lock: RunLockCallback,
    rank: int,
    world_size: int,
) -> Run:
    train = config.train
    torch.manual_seed(train.seed)  # the same random-init model (model.source=random) on every rank
    # Before any ZeRO-3 context exists, on every rank at once: loading the tokenizer converts
    # the embedded model on first use (a file lock lets one rank do it).
    tokenizer = agreed(lambda: load_tokenizer(config.model))
    data = rank_zero_first(lambda: load_splits(config.data, config.model.task, tokenizer))
    eval_texts = rank_zero_first(lambda: load_eval_texts(config.data, tokenizer))
    calibration = None  # the training split
    if config.oneshot.calibration_files:
        files = config.oneshot.calibration_files
        calibration = rank_zero_first(lambda: load_calibration_blocks(files, config.data, tokenizer))
    _check_enough_data(config, len(data.train), world_size, data.labels is not None)
    peak_before_model = peak_memory_bytes()  # the process and its data, no model yet
    memory = _estimate_memory(config, ds_config, world_size) if rank == 0 else None
    max_steps = train.max_steps if method.trains else 0
    args = _training_arguments(config, ds_config, output_dir, max_steps)  # before the model: ZeRO-3
    model, layer_names = build_model(method, tokenizer, data.labels)  # collective under ZeRO-3
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    checkpoints = RunCheckpoints(config, method, output_dir, ds_config, world_size)
    checkpoints.record_base(model)
    point = None
    if train.resume == "auto":
        point = checkpoints.resume_point(
            lambda m: print(f"pst-ds: warning: {m}", flush=True) if rank == 0 else None
        )
    profile = point.sparsity_profile if point is not None else None
    pst = PSTRun(config, method, model, layer_names, calibration, profile)

    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    trainable = trainable if method.trains else 0  # a method that takes no step only carries masks
    weights = [model.get_submodule(name).weight for name in layer_names]
    sparsified = sum(getattr(w, "ds_numel", w.numel()) for w in weights)
    preemption = PreemptionCallback()
    export = None
    if train.export:

        def recovery() -> str:  # what the user does when the export cannot be written
            note = checkpoints.last_note()
            return f"{note}: free space, then python launch/export.py --run {output_dir} writes it"

        export = ExportCallback(output_dir / "export", method, layer_names, tokenizer, recovery, output_dir)
    facts = {
        "pst_layers": len(layer_names),
        "trainable_params": trainable,
        "sparsified_params": sparsified,
        "trainable_percent_of_sparsified": 100 * trainable / sparsified,
        "memory_estimate_bytes_rank0": memory and memory.to_dict(),
        "peak_memory_before_model_bytes_rank0": peak_before_model,
    }
    tokens_per_step = (
        train.micro_batch_size * train.gradient_accumulation_steps * world_size * config.data.block_size
    )
    records = RunRecordsCallback(
        output_dir,
        method,
        {"validation": data.validation, **eval_texts},
        config.model.task,
        pst.callback,
        export,
        facts,
        tokens_per_step,
        train.eval_every,
    )
    callbacks = run_callbacks(lock, preemption, pst.callback, export, records)
    trainer = PSTTrainer(
        pst,
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=collate_for(config.model.task),
        processing_class=tokenizer,
        callbacks=callbacks,
        checkpoints=checkpoints,
        resume_point=point,
    )
    trainer.remove_callback(PrinterCallback)  # its dict per log: the progress bar shows them
    if rank == 0:
        saved = {"experiment": config.to_dict(), "deepspeed": ds_config, "labels": data.labels}
        saved["layers"] = dataclasses.asdict(method.pst)  # the PST section the method's layers use
        (output_dir / "config.json").write_text(json.dumps(saved, indent=2))
        print(
            f"pst-ds: {config.method} on {len(layer_names)} layers, {trainable:,} trainable parameters "
            f"({100 * trainable / sparsified:.2f}% of the {sparsified:,} sparsified weights), "
            f"world size {world_size}",
            flush=True,
        )
    return Run(trainer, lock, preemption, export, records, callbacks[-1], checkpoints)


def _training_arguments(
    config: ExperimentConfig, ds_config: dict[str, Any], output_dir: Path, max_steps: int
) -> TrainingArguments:
    """The Trainer's arguments, every one from the experiment config or the DeepSpeed config."""
    train = config.train
    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ds_config,
        accelerator_config=accelerator_config(),  # on CPU: every rank its share of the data
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=max_steps,
        num_train_epochs=1 if max_steps else 0,  # no steps at all: not epochs instead
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=train.warmup_steps,
        max_grad_norm=ds_config.get("gradient_clipping", 0.0),
        bf16=bool(ds_config.get("bf16", {}).get("enabled")),
        fp16=bool(ds_config.get("fp16", {}).get("enabled")),
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.log_every,
        logging_nan_inf_filter=False,  # a diverged loss is reported, not hidden
        save_strategy="steps",
        save_steps=train.save_every or max(1, max_steps),  # the last step is always saved
        dataloader_drop_last=True,
        dataloader_pin_memory=not on_cpu(),
        use_cpu=on_cpu(),  # bf16 on CPU ranks: the Trainer refuses it otherwise
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,  # the run's own progress bar (callbacks/records.py)
    )


def _check_enough_data(config: ExperimentConfig, blocks: int, world_size: int, classification: bool) -> None:
    """Every rank needs one full micro-batch of training data (identical on all ranks)."""
    if blocks // world_size // config.train.micro_batch_size == 0:
        unit = "examples" if classification else f"blocks of {config.data.block_size} tokens"
        raise ConfigError(
            f"too little training data: {blocks} {unit} for {world_size} rank(s) × "
            f"train.micro_batch_size={config.train.micro_batch_size}; add text to data.train_files "
            "or lower data.block_size or train.micro_batch_size"
        )


def _estimate_memory(config: ExperimentConfig, ds_config: dict, world_size: int) -> MemoryEstimate | None:
    """The memory model's per-rank figure, printed before the model is built (rank 0)."""
    try:
        with torch.random.fork_rng():  # rank 0 alone: the ranks' factor inits must not drift
            result = estimate(config, ds_config, world_size, on_gpu=not on_cpu())
    except Exception as err:  # a diagnostic only: an architecture it cannot trace must still train
        print(f"pst-ds: memory model unavailable for this model ({type(err).__name__}: {err})", flush=True)
        return None
    print(f"pst-ds: memory model: {result.describe()}", flush=True)
    return result
